"""Cutout and CutMix (and CutMix's switch with mixup), drawn on device inside the training step, and the
config's regularisers as the step's keyword arguments.

Cutout: DeVries & Taylor 2017 (`uoguelph-mlrg/Cutout`, `util/cutout.py`): per image, `count` squares of side
`size` centred anywhere in the image and clipped to it, multiplied by zero after crop, flip and
normalisation (zero is the mean colour). CutMix: Yun et al. 2019 (`clovaai/CutMix-PyTorch`, `train.py`;
timm's `mixup.py`): lam ~ Beta(alpha, alpha), one box per batch of area about (1 - lam) centred anywhere,
clipped, the box's pixels taken from the image a random permutation pairs each image with, lam corrected to
the clipped box's area; the loss is `steps.mixup_loss` at the corrected lam. With `data.mixup` > 0 as well,
timm's `Mixup` switch: a batch is mixed with probability `prob`, by CutMix with probability `switch_prob`,
else by mixup.

Every draw comes from the batch's key (`input_pipeline.batch_key` of the data key, epoch and step) with a
salt, so a seed of a k-seed run, a resumed run and a run on any number of devices draw the same.
"""

import dataclasses

import jax
import jax.numpy as jnp

# Folded into a batch's key for its Cutout squares and for its CutMix draws (lam, box, partners, switch).
CUTOUT_SALT = 0xC07
CUTMIX_SALT = 0xC3A


@dataclasses.dataclass(frozen=True)
class Cutout:
  size: int  # the square's side, pixels
  count: int  # squares per image


@dataclasses.dataclass(frozen=True)
class CutMix:
  alpha: float  # lam ~ Beta(alpha, alpha)
  prob: float  # the probability that a batch is mixed at all (by CutMix or, with mixup on, mixup)
  switch_prob: float  # with mixup on: the probability that a mixed batch is CutMix's


def batch_options(config) -> dict:
  """`steps.draw_batch`'s `cutout` and `cutmix` from `config.data` (None when off)."""
  cutout, cutmix = config.data.get('cutout'), config.data.get('cutmix')
  return {'cutout': Cutout(cutout.size, cutout.count) if cutout is not None and cutout.enabled else None,
          'cutmix': (CutMix(float(cutmix.alpha), float(cutmix.prob), float(cutmix.switch_prob))
                     if cutmix is not None and cutmix.enabled else None)}


def label_smoothing(config) -> float:
  """`config.loss.label_smoothing` (0 when the config has none)."""
  loss = config.get('loss')
  return float(loss.get('label_smoothing', 0.0)) if loss is not None else 0.0


def box_masks(boxes: jax.Array, height: int, width: int) -> jax.Array:
  """(..., height, width) booleans, True inside each box (..., 4) = (y1, y2, x1, x2), ends exclusive."""
  rows, cols = jnp.arange(height), jnp.arange(width)
  inside_rows = (rows >= boxes[..., 0:1]) & (rows < boxes[..., 1:2])
  inside_cols = (cols >= boxes[..., 2:3]) & (cols < boxes[..., 3:4])
  return inside_rows[..., :, None] & inside_cols[..., None, :]


def clipped_box(centre: jax.Array, half_height, half_width, height: int, width: int) -> jax.Array:
  """(y1, y2, x1, x2): [centre - half, centre + half) on each axis, clipped to the image (np.clip's)."""
  y, x = centre[..., 0], centre[..., 1]
  return jnp.stack([jnp.clip(y - half_height, 0, height), jnp.clip(y + half_height, 0, height),
                    jnp.clip(x - half_width, 0, width), jnp.clip(x + half_width, 0, width)], axis=-1)


def cutout_boxes(key: jax.Array, num_images: int, size: int, count: int, height: int, width: int):
  """(count, num_images, 4) boxes: `Cutout.__call__`'s y, x = randint(h), randint(w) per square and image,
  [y - size // 2, y + size // 2) clipped."""
  centres = jax.random.randint(key, (count, num_images, 2), 0, jnp.array([height, width]))
  return clipped_box(centres, size // 2, size // 2, height, width)


def cutout(images: jax.Array, key: jax.Array, size: int, count: int) -> jax.Array:
  """Normalised NHWC `images` times Cutout's mask (zero inside any of each image's squares)."""
  n, height, width = images.shape[:3]
  boxes = cutout_boxes(key, n, size, count, height, width)
  keep = ~jnp.any(box_masks(boxes, height, width), axis=0)
  return images * keep[..., None].astype(images.dtype)


def cutmix_box(key: jax.Array, lam: jax.Array, height: int, width: int):
  """(box (4,), corrected lam): `rand_bbox`'s cut of (int(h sqrt(1 - lam)), int(w sqrt(1 - lam))) centred
  at randint(h), randint(w), each side's half (cut // 2) either way, clipped; lam = 1 - box area / image."""
  cut_ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * cut_ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * cut_ratio).astype(jnp.int32)
  centre = jax.random.randint(key, (2,), 0, jnp.array([height, width]))
  box = clipped_box(centre, cut_h // 2, cut_w // 2, height, width)
  area = (box[1] - box[0]) * (box[3] - box[2])
  return box, 1.0 - area.astype(jnp.float32) / (height * width)


def cutmix(images, labels, key, cutmix_options: CutMix, mixup_alpha: float = 0.0):
  """A batch mixed as timm's `Mixup` mixes one (mode 'batch'): with probability `prob` by CutMix (with
  mixup on, by CutMix with probability `switch_prob`, else by BiT's mixup at lam ~ Beta(mixup_alpha,
  mixup_alpha)), else unmixed (lam = 1). The partner of each image is the one a random permutation pairs it
  with (Yun et al.'s `torch.randperm`). Returns `steps.mixup`'s (images, labels, partners' labels, lam per
  row)."""
  apply_key, switch_key, lam_key, box_key, mixup_key, perm_key = jax.random.split(key, 6)
  n, height, width = images.shape[:3]
  perm = jax.random.permutation(perm_key, n)
  partners = images[perm]
  box, lam = cutmix_box(box_key, jax.random.beta(lam_key, cutmix_options.alpha, cutmix_options.alpha),
                        height, width)
  mixed = jnp.where(box_masks(box, height, width)[None, :, :, None], partners, images)
  if mixup_alpha > 0:
    use_cutmix = jax.random.bernoulli(switch_key, cutmix_options.switch_prob)
    mixup_lam = jax.random.beta(mixup_key, mixup_alpha, mixup_alpha)
    mixed = jnp.where(use_cutmix, mixed, mixup_lam * images + (1.0 - mixup_lam) * partners)
    lam = jnp.where(use_cutmix, lam, mixup_lam)
  apply = jax.random.bernoulli(apply_key, cutmix_options.prob)
  mixed, lam = jnp.where(apply, mixed, images), jnp.where(apply, lam, 1.0)
  return mixed, labels, labels[perm], jnp.full(labels.shape, lam, jnp.float32)
