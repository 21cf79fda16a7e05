"""Mixed precision (`model.dtype='bfloat16'`): bfloat16 compute, float32 state, exact resumes, float32 SWA.

docs/architecture.md ("Mixed precision") has the table of which op runs in which dtype.
"""

import re

import chex
import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import builders
from cifar_jax import onednn_conv
from cifar_jax import steps
from cifar_jax import swa
from cifar_jax import train


def _bfloat16_state(config, swa_enabled=False):
  config.model.dtype = 'bfloat16'
  config.swa.enabled = swa_enabled
  model = builders.create_model(config.model)
  lr_fn, momentum_fn = builders.create_schedules(config, 4)
  return builders.create_train_state(jax.random.PRNGKey(0), config, model, lr_fn, momentum_fn)


def _float_dtypes(tree) -> set:
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bfloat16_train_step_computes_in_bfloat16_and_keeps_float32_state(tiny_config):
  state = _bfloat16_state(tiny_config, swa_enabled=True)
  assert state.apply_fn.__self__.dtype == jnp.bfloat16
  assert _float_dtypes(state) == {'float32'}  # params, optimizer state, BatchNorm stats, SWA fields
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
  y = jnp.arange(8) % 10
  step = jax.jit(chex.assert_max_traces(steps.train_step, n=1))
  hlo = step.lower(state, (x, y)).as_text()
  new_state, metrics = step(state, (x, y))
  new_state, metrics = step(new_state, (x, y))
  # The whole state, every field, stays float32 after bfloat16 steps; so do the metrics.
  assert _float_dtypes(new_state) == {'float32'}
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
  assert _float_dtypes(metrics) == {'float32'} and np.isfinite(metrics['loss_sum'])
  assert not np.allclose(state.batch_stats['bn1']['mean'], new_state.batch_stats['bn1']['mean'])
  # The convolutions run in bfloat16: oneDNN's where the CPU has bfloat16 instructions, XLA's elsewhere.
  if builders.conv_impl(tiny_config.model) == 'onednn' and onednn_conv.bfloat16_flag():
    calls = [line for line in hlo.splitlines() if 'cifar_jax_onednn_conv_' in line]
    convolutions = [line for line in calls if '_batch_norm_' not in line]
    # oneDNN's BatchNorm reads and writes the bfloat16 activation (float32 statistics beside it).
    norms = [line for line in calls if '_batch_norm_forward' in line]
    assert norms and all(re.search(r'-> \(tensor<[0-9x]+xbf16>, tensor<[0-9]+xf32>', line) for line in norms)
  else:
    convolutions = [line for line in hlo.splitlines() if 'stablehlo.convolution' in line]
  assert convolutions and all('xbf16>' in line and 'xf32>' not in line for line in convolutions)


def test_swa_in_bfloat16_averages_float32_weights(tiny_config):
  """The average is of the float32 params, not of their bfloat16 roundings."""
  state = _bfloat16_state(tiny_config, swa_enabled=True)
  first = state.params
  # Params that bfloat16 cannot hold: 1 + 2^-12 rounds to 1 in bfloat16 (8 significant bits).
  second = jax.tree.map(lambda p: p + jnp.float32(2.0**-12), first)
  state = swa.update_swa(state)
  state = swa.update_swa(state.replace(params=second))
  assert int(state.swa_count) == 2 and _float_dtypes(state.swa_params) == {'float32'}
  expected = jax.tree.map(lambda a, b: (a + (b - a) / 2.0), first, second)
  chex.assert_trees_all_close(state.swa_params, expected, rtol=0, atol=1e-7)
  rounded = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), expected)
  assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state.swa_params,
                                              rounded)))


@pytest.mark.slow
def test_bfloat16_swa_run_resumes_bitwise(tiny_config, tmp_path):
  """A bfloat16 run with SWA stopped after a mid-epoch checkpoint ends bitwise equal to an uninterrupted
  one; its state, SWA average included, is float32 throughout."""
  config = tiny_config
  config.model.dtype = 'bfloat16'
  config.num_epochs = 3
  config.schedule.name = 'one_cycle'
  config.swa.update(enabled=True, start_epoch=1, lr=0.01, eval_every_epoch=True)
  config.checkpoint_every_steps = 3
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  with pytest.raises(conftest.Crash):  # mid epoch 3 (4 steps per epoch), after one SWA update
    train.train_and_evaluate(config, str(tmp_path / 'crashed'), actions=[conftest.StopAfter(9)])
  resumed = train.train_and_evaluate(config, str(tmp_path / 'crashed'))
  assert int(straight.swa_count) == 2
  assert _float_dtypes(straight) == {'float32'}
  for field in ('params', 'batch_stats', 'opt_state', 'swa_params', 'swa_batch_stats', 'swa_count'):
    chex.assert_trees_all_equal(getattr(resumed, field), getattr(straight, field))
