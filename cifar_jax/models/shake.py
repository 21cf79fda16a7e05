"""Shake-Shake (Gastaldi 2017) and ShakeDrop (Yamada et al. 2018) gates: one factor forward, another backward.

`gate(x, forward, backward)` is the one mechanism: `x * forward` in the forward pass, `g * backward` as the
gradient, a `jax.custom_vjp` (the stop-gradient form `x*bwd + stop_gradient(x*fwd - x*bwd)` of the Google
code rounds the forward value differently; tests/test_shake.py checks both give the same gradients).

Randomness: every gate module draws from the 'shake' rng stream (`steps.shake_key`: from the seed's data key
and the step), folded with the module's path by Flax, so each block, step and seed draws its own. A
per-image draw is made for the *global* batch: under pmap (`axis_name`) each device draws all of it and keeps
its own rows, so 1 and 4 devices draw the same gates (under jit the model sees the global batch already).
The gates drawn are sown to the 'intermediates' collection ('gates': forward, backward), so a test can
feed the torch twin exactly the same ones.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

RNG_STREAM = 'shake'
LEVELS = ('image', 'batch')  # one factor per image, or one for the whole batch
FORWARD_MODES = ('shake', 'even')  # forward: a random factor, or 0.5
BACKWARD_MODES = ('shake', 'even', 'keep')  # backward: an independent draw, 0.5, or the forward draw


@jax.custom_vjp
def gate(x: jax.Array, forward: jax.Array, backward: jax.Array) -> jax.Array:
  """`x * forward`, whose gradient with respect to x is `g * backward` (neither factor gets one)."""
  return x * forward.astype(x.dtype)


def _gate_fwd(x, forward, backward):
  return gate(x, forward, backward), (forward, backward)


def _gate_bwd(residuals, g):
  forward, backward = residuals
  return g * backward.astype(g.dtype), jnp.zeros_like(forward), jnp.zeros_like(backward)


gate.defvjp(_gate_fwd, _gate_bwd)


def uniform_draw(key: jax.Array, num_images: int, level: str, minval: float, maxval: float,
                 axis_name: str | None = None) -> jax.Array:
  """U(minval, maxval) factors shaped to broadcast over NHWC: (num_images, 1, 1, 1) or () per batch.

  Per image, under pmap (`axis_name`), the draw is over the global batch and this device keeps its rows,
  so the factors do not depend on the device count.
  """
  if level == 'batch':
    return jax.random.uniform(key, (), jnp.float32, minval, maxval)
  if axis_name is None:
    u = jax.random.uniform(key, (num_images,), jnp.float32, minval, maxval)
  else:
    devices = jax.lax.psum(1, axis_name)
    u = jax.random.uniform(key, (num_images * devices,), jnp.float32, minval, maxval)
    u = jax.lax.dynamic_slice_in_dim(u, jax.lax.axis_index(axis_name) * num_images, num_images)
  return u.reshape((num_images, 1, 1, 1))


class ShakeShake(nn.Module):
  """`a * b1 + (1 - a) * b2` forward, `beta` in place of `a` backward; 0.5 / 0.5 in eval mode.

  `forward`: 'shake' (a ~ U(0, 1)) or 'even' (0.5); `backward`: 'shake' (beta ~ U(0, 1), independent),
  'even' (0.5) or 'keep' (beta = a); `level`: 'image' or 'batch'.
  """

  forward: str = 'shake'
  backward: str = 'shake'
  level: str = 'image'
  axis_name: str | None = None

  @nn.compact
  def __call__(self, b1, b2, train: bool):
    if not train:
      return 0.5 * b1 + 0.5 * b2
    key_a, key_b = jax.random.split(self.make_rng(RNG_STREAM))
    n = b1.shape[0]
    half = jnp.full((), 0.5, jnp.float32)
    a = uniform_draw(key_a, n, self.level, 0.0, 1.0, self.axis_name) if self.forward == 'shake' else half
    if self.backward == 'shake':
      beta = uniform_draw(key_b, n, self.level, 0.0, 1.0, self.axis_name)
    else:
      beta = a if self.backward == 'keep' else half
    self.sow('intermediates', 'gates', {'forward': a, 'backward': beta})
    return gate(b1, a, beta) + gate(b2, 1.0 - a, 1.0 - beta)


class ShakeDrop(nn.Module):
  """F scaled by `b + a - b*a` forward and `b + c - b*c` backward, b ~ Bernoulli(p), a ~ U(alpha_range),
  c ~ U(beta_range); by `p + E[a] - p*E[a]` (= p for a ~ U(-1, 1)) in eval mode.

  a and c are drawn per image; b per image (`level='image'`, the Google code) or once per batch
  (`level='batch'`, owruby/shake-drop_pytorch).
  """

  p: float  # the probability of keeping the branch as it is (b = 1)
  level: str = 'image'
  alpha_range: tuple[float, float] = (-1.0, 1.0)
  beta_range: tuple[float, float] = (0.0, 1.0)
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    if not train:
      expected_alpha = 0.5 * (self.alpha_range[0] + self.alpha_range[1])
      return x * jnp.asarray(self.p + expected_alpha - self.p * expected_alpha, x.dtype)
    key_b, key_a, key_c = jax.random.split(self.make_rng(RNG_STREAM), 3)
    n = x.shape[0]
    # Bernoulli(p) as jax.random.bernoulli draws it: uniform < p.
    b = (uniform_draw(key_b, n, self.level, 0.0, 1.0, self.axis_name) < self.p).astype(jnp.float32)
    a = uniform_draw(key_a, n, 'image', *self.alpha_range, axis_name=self.axis_name)
    c = uniform_draw(key_c, n, 'image', *self.beta_range, axis_name=self.axis_name)
    forward = b + a - b * a
    backward = b + c - b * c
    self.sow('intermediates', 'gates', {'forward': forward, 'backward': backward})
    return gate(x, forward, backward)


def shakedrop_probability(block: int, num_blocks: int, p_last: float) -> float:
  """p_l = 1 - (l / L)(1 - p_L) for block l = 1..L (the linear decay rule, as Google's flax_models)."""
  return 1.0 - (block / num_blocks) * (1.0 - p_last)

