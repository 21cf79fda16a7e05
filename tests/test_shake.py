"""Shake-Shake and ShakeDrop: the gradient rule, the draws, eval mode, parameter counts, bad configs."""

import functools
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import builders
from cifar_jax import config_lib
from cifar_jax import metrics_writer
from cifar_jax import models
from cifar_jax import steps
from cifar_jax import train
from cifar_jax.errors import ConfigError
from cifar_jax.models import shake
from configs import default
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _branches(seed=0, shape=(4, 3, 3, 2)):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, shape), jax.random.normal(k2, shape)


def test_gate_forward_is_the_forward_factor_and_gradient_the_backward_one():
  x, g = _branches()
  forward = jnp.array([0.2, 0.7, 0.1, 0.9]).reshape(4, 1, 1, 1)
  backward = jnp.array([0.6, 0.3, 0.8, 0.5]).reshape(4, 1, 1, 1)
  y, vjp = jax.vjp(shake.gate, x, forward, backward)
  np.testing.assert_array_equal(y, x * forward)
  dx, dforward, dbackward = vjp(g)
  np.testing.assert_array_equal(dx, g * backward)
  assert not np.any(dforward) and not np.any(dbackward)


def test_gate_equals_the_stop_gradient_form_of_the_google_code():
  """The custom_vjp and `x*bwd + stop_gradient(x*fwd - x*bwd)` (flax_models/cifar) give the same gradients;
  forward values differ only by the rounding of the subtraction."""
  x, g = _branches(1)
  forward, backward = jnp.float32(-0.37), jnp.float32(0.81)
  stop_gradient_form = lambda x: x * backward + jax.lax.stop_gradient(x * forward - x * backward)
  y1, vjp1 = jax.vjp(lambda x: shake.gate(x, forward, backward), x)
  y2, vjp2 = jax.vjp(stop_gradient_form, x)
  np.testing.assert_allclose(y1, y2, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(vjp1(g)[0], vjp2(g)[0])


def _apply(module, *args, key=0, train=True):
  variables = module.init({'params': jax.random.key(0), 'shake': jax.random.key(key)}, *args, train=train)
  out, state = module.apply(variables, *args, train=train, rngs={'shake': jax.random.key(key)},
                            mutable=['intermediates'])
  return out, state['intermediates']['gates'][0]


@pytest.mark.parametrize('backward', shake.BACKWARD_MODES)
def test_shake_shake_gradient_per_branch_is_the_backward_gate(backward):
  b1, b2 = _branches(2)
  g = jax.random.normal(jax.random.key(3), b1.shape)
  mix = shake.ShakeShake(backward=backward)
  out, gates = _apply(mix, b1, b2)
  a, beta = gates['forward'], gates['backward']
  assert a.shape == (4, 1, 1, 1)
  assert np.all((a >= 0) & (a < 1)) and len(np.unique(a)) == 4  # one draw per image
  np.testing.assert_allclose(out, a * b1 + (1 - a) * b2, rtol=1e-6, atol=1e-6)
  _, vjp = jax.vjp(lambda u, v: mix.apply({}, u, v, train=True, rngs={'shake': jax.random.key(0)}), b1, b2)
  d1, d2 = vjp(g)
  want_beta = {'shake': beta, 'even': 0.5, 'keep': a}[backward]
  if backward == 'shake':
    assert not np.allclose(beta, a)
  np.testing.assert_allclose(d1, g * want_beta, rtol=1e-6)
  np.testing.assert_allclose(d2, g * (1 - want_beta), rtol=1e-6)


def test_shake_shake_even_forward_batch_level_and_eval():
  b1, b2 = _branches(4)
  out, gates = _apply(shake.ShakeShake(forward='even', level='batch'), b1, b2)
  np.testing.assert_array_equal(gates['forward'], 0.5)
  assert gates['backward'].shape == ()  # one draw for the batch
  np.testing.assert_allclose(out, 0.5 * b1 + 0.5 * b2, rtol=1e-6)
  out_eval = shake.ShakeShake().apply({}, b1, b2, train=False)  # no rng needed: deterministic
  np.testing.assert_array_equal(out_eval, 0.5 * b1 + 0.5 * b2)


@pytest.mark.parametrize('level', shake.LEVELS)
def test_shakedrop_gradient_is_b_plus_c_minus_bc(level):
  x, g = _branches(5, shape=(64, 2, 2, 3))
  drop = shake.ShakeDrop(p=0.5, level=level)
  out, gates = _apply(drop, x)
  forward, backward = gates['forward'], gates['backward']
  np.testing.assert_allclose(out, x * forward, rtol=1e-6)
  _, vjp = jax.vjp(lambda u: drop.apply({}, u, train=True, rngs={'shake': jax.random.key(0)}), x)
  np.testing.assert_allclose(vjp(g)[0], g * backward, rtol=1e-6)
  # b = 1 keeps the branch both ways; b = 0 scales it by a in [-1, 1) forward and c in [0, 1) backward.
  kept = np.isclose(forward, 1.0) & np.isclose(backward, 1.0)
  dropped = ~kept
  assert np.all((forward[dropped] >= -1) & (forward[dropped] < 1))
  assert np.all((backward[dropped] >= 0) & (backward[dropped] < 1))
  if level == 'batch':
    assert kept.all() or dropped.all()
  else:
    assert 0 < kept.sum() < 64  # per image: some of 64 images kept, some not (p = 0.5)
  out_eval = drop.apply({}, x, train=False)
  np.testing.assert_allclose(out_eval, 0.5 * x, rtol=1e-6)


def test_shakedrop_probability_falls_linearly_to_p_last():
  assert [shake.shakedrop_probability(block, 4, 0.5) for block in range(1, 5)] == [0.875, 0.75, 0.625, 0.5]


def test_gates_differ_across_blocks_steps_and_seeds():
  """Each block draws its own gates (Flax folds the module path into the 'shake' stream), each step and
  each seed their own (`steps.shake_rngs` of the seed's data key and the step)."""
  model = models.create_model('resnet9', width_multiplier=0.125, shakedrop_p_last=0.5)
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)

  def gates(data_key, epoch, index):
    _, state = model.apply(variables, x, train=True, rngs=steps.shake_rngs(data_key, epoch, index),
                           mutable=['batch_stats', 'intermediates'])
    return [np.asarray(block['shakedrop']['gates'][0]['forward']) for block in
            (state['intermediates'][f'layer{i}_0'] for i in range(1, 5))]

  key0, key1 = builders.run_keys(0)[1], builders.run_keys(1)[1]
  first = gates(key0, 0, 0)
  assert all(not np.array_equal(first[0], other) for other in first[1:])  # blocks
  assert not np.array_equal(first[0], gates(key0, 0, 1)[0])  # steps
  assert not np.array_equal(first[0], gates(key0, 1, 0)[0])  # epochs
  assert not np.array_equal(first[0], gates(key1, 0, 0)[0])  # seeds
  np.testing.assert_array_equal(first[0], gates(key0, 0, 0)[0])  # a function of (seed, step) alone


def test_per_image_draws_under_pmap_equal_the_global_batchs():
  """Under pmap each device keeps its rows of the global batch's draw: 1 and 2 devices, same gates."""
  key = jax.random.key(7)
  whole = shake.uniform_draw(key, 8, 'image', 0.0, 1.0)
  devices = jax.local_device_count()
  if devices < 2:
    # One CPU device: vmap with an axis name stands in for pmap (axis_index and psum behave the same).
    rows = jax.vmap(lambda _: shake.uniform_draw(key, 4, 'image', 0.0, 1.0, axis_name='d'),
                    axis_name='d')(jnp.arange(2))
  else:
    rows = jax.pmap(lambda _: shake.uniform_draw(key, 4, 'image', 0.0, 1.0, axis_name='d'),
                    axis_name='d', devices=jax.local_devices()[:2])(jnp.arange(2))
  np.testing.assert_array_equal(np.asarray(rows).reshape(8, 1, 1, 1), whole)


def _count(name, **kwargs):
  model = models.create_model(name, **kwargs)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  return builders.parameter_count(shapes['params'])


@pytest.mark.parametrize('base_width,millions', [(32, 2.9), (64, 11.7), (96, 26.2)])
def test_shake_shake_parameter_counts_match_the_paper(base_width, millions):
  assert abs(_count('shake_shake', depth=26, base_width=base_width) / 1e6 - millions) < 0.1


@pytest.mark.parametrize('depth,alpha,block,millions', [(272, 200, 'bottleneck', 26.0),
                                                        (110, 270, 'basic', 28.3), (110, 48, 'basic', 1.7)])
def test_pyramidnet_parameter_counts_match_the_paper(depth, alpha, block, millions):
  """Han et al.'s Table 4 / ShakeDrop's; both references round the widths, which adds ~0.2 M (sam README)."""
  assert abs(_count('pyramidnet', depth=depth, alpha=alpha, block=block) / 1e6 - millions) < 0.25


def test_shakedrop_off_leaves_the_blogs_resnet_unchanged():
  """p_last = 1 builds no ShakeDrop module: same params, same logits, no rng needed."""
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  plain = models.create_model('resnet9', width_multiplier=0.125)
  variables = plain.init(jax.random.key(0), x, train=False)
  out = plain.apply(variables, x, train=True, mutable=['batch_stats'])[0]
  off = models.create_model('resnet9', width_multiplier=0.125, shakedrop_p_last=1.0)
  np.testing.assert_array_equal(off.apply(variables, x, train=True, mutable=['batch_stats'])[0], out)


@pytest.mark.parametrize('field,value,message', [
    ('model.shake.forward', 'wobble', 'model.shake.forward'),
    ('model.shake.backward', 'random', 'model.shake.backward'),
    ('model.depth', 27, 'model.depth=27'),
])
def test_bad_shake_shake_configs_are_one_line(field, value, message):
  config = default.get_config()
  config.model.name = 'shake_shake'
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


@pytest.mark.parametrize('name,field,value,message', [
    ('resnet18', 'model.shakedrop.p_last', 0.0, r'p_last=0.0 must be in \(0, 1\]'),
    ('resnet18', 'model.shakedrop.p_last', 1.5, r'p_last=1.5 must be in \(0, 1\]'),
    ('pyramidnet', 'model.depth', 100, 'model.depth=100: a basic PyramidNet needs depth = 6n \\+ 2'),
    ('pyramidnet', 'model.block', 'wide', 'model.block'),
    ('resnet18', 'model.shakedrop.level', 'pixel', 'model.shakedrop.level'),
])
def test_bad_shakedrop_configs_are_one_line(name, field, value, message):
  config = default.get_config()
  config.model.name = name
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


def test_models_table_builds_every_family():
  for name in models.MODELS:
    assert isinstance(models.create_model(name), nn.Module)


def test_k_seeds_draw_the_single_runs_gates_and_train_as_they_do(tiny_config, tmp_path):
  """Seed i of a k = 2 run draws bitwise the gates of the single run of seed + i (same keys) and its
  training agrees with that run's within float32 rounding (tests/test_seeds.py's tolerance)."""
  tiny_config.model.shakedrop.p_last = 0.5
  tiny_config.num_epochs = 1
  tiny_config.data.synthetic_train_size = 128
  tiny_config.data.synthetic_seed = 0  # a k-seed run's seeds share the images
  stacked, _ = builders.seed_data_keys(_with(tiny_config, num_seeds=2))
  keys = jax.vmap(lambda k: steps.shake_rngs(k, 0, 1)['shake'])(stacked)
  for i in range(2):
    single = steps.shake_rngs(builders.run_keys(i)[1], 0, 1)['shake']
    np.testing.assert_array_equal(jax.random.key_data(keys[i]), jax.random.key_data(single))
  k_state = train.train_and_evaluate(_with(tiny_config, num_seeds=2), str(tmp_path / 'k2'))
  for i in range(2):
    single = train.train_and_evaluate(_with(tiny_config, seed=i), str(tmp_path / f'seed_{i}'))
    got = steps.unstack_seed((k_state.params, k_state.batch_stats), i)
    chex.assert_trees_all_close(got, (single.params, single.batch_stats), rtol=1e-5, atol=1e-5)


def _with(config, **fields):
  config = config.copy_and_resolve_references()
  config.update(fields)
  return config


@pytest.mark.slow  # three command-line runs (about 15 s each on 2 idle cores)
def test_one_and_four_devices_draw_the_same_gates_and_train_alike(tmp_path):
  """ShakeDrop's per-image gates on 1 device, 4 under jit (the model sees the global batch) and 4 under pmap
  (each device keeps its rows of the global draw): one epoch gives the same losses and params within
  float32 rounding (measured 9e-7, as without ShakeDrop; a device drawing its own gates would move them by
  1e-2 or more). Longer runs drift further apart than the plain model's (ShakeDrop's sign flips amplify
  rounding: 3x over 3 epochs, one device, oneDNN vs XLA convolutions), so the check is one epoch."""
  args = ['--config=configs/tiny.py', '--config.model.shakedrop.p_last=0.5', '--config.model.conv=xla',
          '--config.num_epochs=1', '--config.data.synthetic_train_size=192']
  runs = {'one': ['--config.cpu_devices=1'], 'jit': ['--config.cpu_devices=4'],
          'pmap': ['--config.cpu_devices=4', '--config.parallelism=pmap']}
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  results = {}
  for name, extra in runs.items():
    workdir = str(tmp_path / name)
    proc = subprocess.run([sys.executable, '-m', 'cifar_jax.main', f'--workdir={workdir}', *args, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = metrics_writer.read_metrics(workdir)[-1]
    results[name] = (record['train_loss'], record['eval_loss'])
    config = tiny.get_config()
    config.model.shakedrop.p_last = 0.5
    config.data.synthetic_train_size = 192
    config.num_epochs = 1
    state = train.restore_state(config, workdir, steps_per_epoch=3)
    results[name] += (jax.device_get(state.params),)
  for name in ('jit', 'pmap'):
    assert results[name][0] == pytest.approx(results['one'][0], rel=1e-5)
    assert results[name][1] == pytest.approx(results['one'][1], rel=1e-5)
    chex.assert_trees_all_close(results[name][2], results['one'][2], rtol=1e-5, atol=1e-5)
