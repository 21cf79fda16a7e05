"""Test-time augmentation (`evaluation.tta`): airbench's views and weights, averaged inside the compiled eval.

airbench94.py's `infer` (tta_level 1: mirror; 2: mirror plus one-pixel translations) evaluates
- 'flip': the image and its left-right mirror, weights 1/2 each;
- 'flip_translate': those two (1/4 each) and, each with its mirror, the image translated by one pixel
  up and left and by one pixel down and right (1/8 each): 6 views. A translation reflects the border
  (torch's F.pad(..., 'reflect'), which does not repeat the edge pixel) and crops 32 x 32 again.
airbench averages the views' logits; here the views' softmax probabilities are averaged with the same
weights (in log space, as an ensemble's: `calibration.mean_log_probs`), so a row's views average as its
models do. Every view of a batch goes through the model in one call (views x batch images), in eval mode,
so BatchNorm sees nothing of the other views.
"""

import jax
import jax.numpy as jnp
import numpy as np

LEVELS = ('none', 'flip', 'flip_translate')
# (dy, dx, mirrored, weight) of each view: output pixel (i, j) is input pixel (i + dy, j + dx), the border
# reflected, and mirrored left-right after the translation (airbench flips the translated image).
VIEWS = {
    'none': ((0, 0, False, 1.0),),
    'flip': ((0, 0, False, 0.5), (0, 0, True, 0.5)),
    'flip_translate': ((0, 0, False, 0.25), (0, 0, True, 0.25),
                       (-1, -1, False, 0.125), (-1, -1, True, 0.125),
                       (1, 1, False, 0.125), (1, 1, True, 0.125)),
}


def level(config) -> str:
  """`config.evaluation.tta`, 'none' where the config has no such field."""
  return config.get('evaluation', {}).get('tta', 'none')


def num_views(tta: str) -> int:
  return len(VIEWS[tta])


def translate(images: jax.Array, dy: int, dx: int) -> jax.Array:
  """NHWC images moved so that output (i, j) is input (i + dy, j + dx), the border reflected (|d| <= 1)."""
  if dy == 0 and dx == 0:
    return images
  pad = 1
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')
  h, w = images.shape[1:3]
  return padded[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w, :]


def views(images: jax.Array, tta: str) -> jax.Array:
  """(views, N, H, W, C): each view of `tta` of the NHWC `images`, in `VIEWS` order."""
  out = []
  for dy, dx, mirrored, _ in VIEWS[tta]:
    view = translate(images, dy, dx)
    out.append(view[:, :, ::-1, :] if mirrored else view)
  return jnp.stack(out)


def log_weights(tta: str) -> np.ndarray:
  return np.log(np.asarray([w for *_, w in VIEWS[tta]], np.float32))


def log_probs(logits_fn, images: jax.Array, tta: str) -> jax.Array:
  """log of the weighted mean over the views of `tta` of softmax(logits_fn(view)): (N, classes).

  `logits_fn` maps a batch of uint8 NHWC images to logits; it is called once, on every view at once.
  """
  n = images.shape[0]
  stacked = views(images, tta)
  logits = logits_fn(stacked.reshape((-1,) + images.shape[1:]))
  per_view = jax.nn.log_softmax(logits.astype(jnp.float32).reshape((stacked.shape[0], n, -1)))
  return jax.nn.logsumexp(per_view + jnp.asarray(log_weights(tta))[:, None, None], axis=0)
