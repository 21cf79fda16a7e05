"""SWAG (Maddox et al. 2019, `wjmaddox/swa_gaussian` swag/posteriors/swag.py): a Gaussian over the weights
from the SWA snapshots, and samples of it.

Collected at the moments SWA averages (`update_swag` after `swa.update_swa`), held in the TrainState so a
checkpoint resumes mid-collection:
- the mean is the SWA average itself (`swa_params`), so a sample of scale 0 is the SWA model exactly;
- the second moment q <- q n / (n + 1) + theta^2 / (n + 1) (`swag_sq_mean`);
- the deviation d = theta - m (with the updated mean) shifted into the last column of a (K, ...) buffer per
  parameter (`swag_deviations`): the last K snapshots' deviations, oldest first, zeros before K are
  collected (a zero column adds nothing to D z).
A sample: theta = m + sqrt(scale) * (sqrt(clamp(q - m^2, var_clamp)) * z1 + D^T z2 / sqrt(c - 1)), with
c = min(n, K) the deviations held (the reference divides by sqrt(K - 1) even before K are collected: this
divides by sqrt(c - 1) then, and by 1 when c = 1, whose deviation is 0). `diag_only` drops the D term and
does not hold D. Each sample gets its BatchNorm statistics recomputed (`program.Program.swag_evaluate`).
"""

import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax.errors import ConfigError

# Folded into a seed's key for its SWAG samples (sample i: fold_in(key, i)).
SAMPLE_SALT = 0x5A6
BYTES_PER_FLOAT = 4
# Auto samples per vmap-ed call: each holds a model's activations in the BatchNorm pass.
AUTO_SAMPLES_PER_CALL = 4


def init_swag(state, rank: int, diag_only: bool):
  """Empty SWAG fields for `state` (SWA fields initialised): second moment zeros, K zero deviations."""
  deviations = None if diag_only else jax.tree.map(lambda p: jnp.zeros((rank,) + p.shape, p.dtype),
                                                    state.params)
  return state.replace(swag_sq_mean=jax.tree.map(jnp.zeros_like, state.params),
                       swag_deviations=deviations)


def update_swag(state, n_before):
  """Folds the current params into the second moment and the deviations; call after `swa.update_swa`
  (whose updated average is the mean) with the count `n_before` the average had before it."""
  n = n_before.astype(jnp.float32)

  def second_moment(q, p):
    return q * (n / (n + 1.0)) + p * p / (n + 1.0)

  def shifted(d, p, m):
    return jnp.concatenate([d[1:], (p - m)[None]], axis=0)

  sq_mean = jax.tree.map(second_moment, state.swag_sq_mean, state.params)
  deviations = state.swag_deviations
  if deviations is not None:
    deviations = jax.tree.map(shifted, deviations, state.params, state.swa_params)
  return state.replace(swag_sq_mean=sq_mean, swag_deviations=deviations)


def update_swa_and_swag(state, swa_update):
  """`swa_update(state)` (the SWA average), then `update_swag` with the same snapshot."""
  return update_swag(swa_update(state), state.swa_count)


def variance(mean, sq_mean, var_clamp: float):
  """The diagonal variance clamp(q - m^2, var_clamp) of each parameter."""
  return jax.tree.map(lambda m, q: jnp.maximum(q - m * m, var_clamp), mean, sq_mean)


def held(count, rank: int):
  """How many deviation columns hold snapshots: min(count, K)."""
  return jnp.minimum(count, rank)


def sample(mean, sq_mean, deviations, count, z1, z2, *, scale: float, var_clamp: float):
  """One SWAG sample of the params for the noises z1 (a params tree) and z2 (K,) (module docstring).

  `deviations` is None for diag_only.
  """
  std = jax.tree.map(jnp.sqrt, variance(mean, sq_mean, var_clamp))
  noise = jax.tree.map(jnp.multiply, std, z1)
  if deviations is not None:
    rank = z2.shape[0]
    divisor = jnp.sqrt(jnp.maximum(held(count, rank) - 1, 1).astype(jnp.float32))
    low_rank = jax.tree.map(lambda d: jnp.tensordot(z2, d, axes=1) / divisor, deviations)
    noise = jax.tree.map(jnp.add, noise, low_rank)
  root = np.float32(np.sqrt(scale))
  return jax.tree.map(lambda m, e: m + root * e, mean, noise)


def draw_noise(key, params, rank: int):
  """z1 ~ N(0, I) shaped like `params` and z2 ~ N(0, I_K) from `key`.

  z1 is one draw of every parameter's count, split into the leaves: one threefry program instead of one
  per leaf, which XLA:CPU compiled 8x slower (ResNet18's 62 leaves: 286 s against 36 s, vmap-ed over 4
  samples and 3 seeds, on the loaded 2-core CPU).
  """
  leaves, treedef = jax.tree.flatten(params)
  key_z2, key_z1 = jax.random.split(key)
  sizes = [int(np.prod(p.shape)) for p in leaves]
  flat = jax.random.normal(key_z1, (sum(sizes),), jnp.float32)
  z1 = [x.reshape(p.shape).astype(p.dtype) for x, p in zip(jnp.split(flat, np.cumsum(sizes)[:-1]), leaves)]
  return jax.tree.unflatten(treedef, z1), jax.random.normal(key_z2, (rank,), jnp.float32)


def sample_chunk(state, sample_key, first, *, chunk: int, rank: int, scale: float, var_clamp: float):
  """Samples first, .., first + chunk - 1 of one seed: params with a leading axis of `chunk`."""

  def one(index):
    z1, z2 = draw_noise(jax.random.fold_in(sample_key, index), state.params, rank)
    return sample(state.swa_params, state.swag_sq_mean, state.swag_deviations, state.swa_count, z1, z2,
                  scale=scale, var_clamp=var_clamp)

  return jax.vmap(one)(first + jnp.arange(chunk))


def sample_keys(seed: int, num_seeds: int):
  """The key of each seed's SWAG samples, from config.seed (seed i: seed + i's, as its run would)."""
  keys = [jax.random.fold_in(jax.random.PRNGKey(seed + i), SAMPLE_SALT) for i in range(num_seeds)]
  return keys[0] if num_seeds == 1 else np.stack([np.asarray(k) for k in keys])


def samples_per_call(swag_config) -> int:
  """`swag.samples_per_call`, or (0, auto) the largest divisor of num_samples up to AUTO_SAMPLES_PER_CALL."""
  if swag_config.samples_per_call > 0:
    return swag_config.samples_per_call
  n = swag_config.num_samples
  return max(c for c in range(1, min(n, AUTO_SAMPLES_PER_CALL) + 1) if n % c == 0)


def memory_bytes(num_params: int, rank: int, diag_only: bool, num_seeds: int) -> int:
  """What SWAG holds beyond SWA: the second moment and K deviations of every parameter, every seed."""
  return num_seeds * num_params * (1 + (0 if diag_only else rank)) * BYTES_PER_FLOAT


def available_bytes() -> int | None:
  """Free memory of the first device: the accelerator's limit less its use, or the host's MemAvailable."""
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != 'cpu' else None
  if stats and 'bytes_limit' in stats:
    return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))
  if os.path.exists('/proc/meminfo'):
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  return None


def check_memory(swag_config, params, num_seeds: int) -> None:
  """Logs what SWAG holds (K |theta| floats per seed and the second moment) and refuses, with one line,
  a run whose SWAG state alone exceeds the free memory."""
  num_params = sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(params)) // num_seeds
  need = memory_bytes(num_params, swag_config.rank, swag_config.diag_only, num_seeds)
  free = available_bytes()
  logging.info('SWAG: rank %d over %d params x %d seeds holds %.2f GB (free: %s)', swag_config.rank,
               num_params, num_seeds, need / 1e9, 'unknown' if free is None else f'{free / 1e9:.1f} GB')
  if free is not None and need > free:
    raise ConfigError(
        f'swag.rank={swag_config.rank} needs {need / 1e9:.2f} GB for {num_params} params x {num_seeds} '
        f'seeds, more than the {free / 1e9:.1f} GB free; lower swag.rank, set swag.diag_only=True, or '
        'fewer num_seeds')


def log_divisor(count: int, rank: int) -> None:
  """Says when the low-rank term divides by sqrt(collected - 1) instead of sqrt(K - 1)."""
  if 1 < count < rank:
    logging.warning('SWAG: %d of swag.rank=%d deviations collected; the low-rank term divides by '
                    'sqrt(%d - 1), not sqrt(K - 1)', count, rank, count)
