"""Gradient accumulation (`optimizer.micro_batches`, steps.train_step_micro_batches): the micro-batches of a
batch take the whole batch's step for a model without BatchNorm, the torch twin's accumulation loop for
one with it; k seeds, a resume and several devices train as everywhere; bad settings are one line.

Tolerances: micro-batches add the same float32 gradients in another order. Measured on the GroupNorm model
below after one step: params within 8e-7 of each tensor's largest value, the update itself within 5e-5 of
its largest value; a wrong weighting or a wrong split moves the update by 10 % or more.
"""

import functools
import json
import os
import subprocess
import sys

import chex
import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from cifar_jax import builders  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import lr_curves  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import lr_find  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import memory  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import steps  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position

PARAMS_RTOL = 2e-6  # measured 8e-7
UPDATE_RTOL = 1e-3  # measured 5e-5
SUBPROCESS_TIMEOUT_S = 420


def rel_err(a, b) -> float:
  """max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize('size, n', [(64, 4), (8, 4), (6, 4), (7, 3), (3, 4), (1, 2), (10, 1)])
def test_micro_batch_sizes_are_tensor_splits(size, n):
  """torch.tensor_split's (numpy.array_split's) sizes, without its empty pieces."""
  want = [len(a) for a in np.array_split(np.arange(size), n) if len(a)]
  assert steps.micro_batch_sizes(size, n) == want and sum(want) == size


@functools.lru_cache(maxsize=1)
def _group_norm_args():
  """A GroupNorm ResNet9's initial state and a step's data arguments (synthetic images), made once so
  that every compiled step takes the same state (its apply_fn and optimizer are static)."""
  config = tiny.get_config()
  config.model.norm = 'group_ws'
  config.model.conv = 'xla'
  model = builders.create_model(config.model)
  lr_fn, momentum_fn = builders.create_schedules(config, 4)
  state = builders.create_train_state(jax.random.key(0), config, model, lr_fn, momentum_fn)
  data = input_pipeline.make_synthetic(200, 0)
  key = jax.random.key(1)
  perm = input_pipeline.epoch_permutation(key, 0, 200)
  return (state, steps.init_train_metrics(), jnp.asarray(data['x_train']), jnp.asarray(data['y_train']),
          perm, key)


def _group_norm_step(n: int, size: int = 64):
  """One step of the GroupNorm ResNet9 in `n` micro-batches, compiled for a batch of `size`."""
  args = _group_norm_args()
  step = jax.jit(functools.partial(steps.train_step_on_device_data, steps_per_epoch=4, batch_size=64,
                                   size=size, augment=True, micro_batches=n))
  return step.lower(*args).compile(), args


def _assert_same_step(got, want, start):
  """Params `got` and `want` within PARAMS_RTOL, their updates from `start` within UPDATE_RTOL."""
  for (path, a), b, p in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                             jax.tree.leaves(start)):
    assert rel_err(a, b) < PARAMS_RTOL, jax.tree_util.keystr(path)
    assert rel_err(np.asarray(a) - p, np.asarray(b) - p) < UPDATE_RTOL, jax.tree_util.keystr(path)


def test_micro_batches_take_the_whole_batchs_step_without_batchnorm():
  """GroupNorm (no BatchNorm): the update of 2 and 4 micro-batches is the whole batch's, the loss and
  accuracy sums too, and the compiled step plans for one micro-batch's activations."""
  compiled = {n: _group_norm_step(n) for n in (1, 2, 4)}
  args = compiled[1][1]
  start = args[0].params
  (want, want_sums) = compiled[1][0](*args)
  for n in (2, 4):
    got, sums = compiled[n][0](*args)
    for key in ('loss_sum', 'correct', 'count'):
      np.testing.assert_allclose(float(sums[key]), float(want_sums[key]), rtol=1e-6)
    _assert_same_step(got.params, want.params, start)
    chex.assert_trees_all_close(got.opt_state, want.opt_state, rtol=1e-3, atol=1e-6)
  plans = {n: memory.step_memory(c) for n, (c, _) in compiled.items()}
  assert plans[2].temp < 0.75 * plans[1].temp and plans[4].temp < 0.75 * plans[2].temp, plans
  # The refusal's suggestion (memory.check) estimates these plans from the whole batch's
  params = memory.shard_bytes(start)
  for n in (2, 4):
    estimate = plans[1].estimate(1 / n, memory.accumulator_bytes(1, params))
    assert abs(estimate - plans[n].peak) < 0.15 * plans[n].peak, (n, estimate, plans[n])


def test_a_partial_batch_splits_unevenly_and_still_takes_its_step():
  """A last batch of 7 in 4 micro-batches (2, 2, 2, 1): weighted by size, the whole batch's step."""
  (one, args), (four, _) = _group_norm_step(1, size=7), _group_norm_step(4, size=7)
  want, want_sums = one(*args)
  got, sums = four(*args)
  assert float(sums['count']) == 7
  np.testing.assert_allclose(float(sums['loss_sum']), float(want_sums['loss_sum']), rtol=1e-6)
  _assert_same_step(got.params, want.params, args[0].params)


def test_micro_batches_follow_the_torch_twins_accumulation_loop():
  """A BatchNorm ResNet9 for one epoch of 5 steps (the last a partial batch of 6 in micro-batches of
  2, 2, 1, 1): the trainer's jitted steps against the twin's `train_epoch(micro_batches=4)` on the same
  'identical' batches: mean loss, params and BatchNorm running statistics; and BatchNorm saw micro-batches
  (the same epoch in whole batches ends elsewhere)."""
  pytest.importorskip('torch')
  import test_torch_parity as parity  # pylint: disable=g-import-not-at-top (needs torch)

  config = parity.smoke.get_config()
  config.num_epochs, config.batch_size = 1, 8
  config.model.width_multiplier = parity.WIDTH
  config.data.synthetic_train_size, config.data.synthetic_eval_size = 38, 8
  config.optimizer.micro_batches = 4
  dataset, model, variables, optimizer = parity._twin(config)  # pylint: disable=protected-access
  n, spe = dataset.num_train, 5
  batches = list(torch_reference.torch_batches(dataset, config, 0, 'identical'))
  record = torch_reference.train_epoch(model, optimizer, batches, 'cpu', micro_batches=4)
  assert record['num_steps'] == 5 and record['num_images'] == 38

  lr_fn, momentum_fn = builders.create_schedules(config, spe)
  start = builders.create_train_state(jax.random.key(0), config, builders.create_model(config.model),
                                      lr_fn, momentum_fn)
  start = start.replace(params=variables['params'], batch_stats=variables['batch_stats'])
  data_key = torch_reference.jax_data_key(config.seed)
  perm = input_pipeline.epoch_permutation(data_key, 0, n)

  def epoch(micro_batches):
    state, acc = start, steps.init_train_metrics()
    for size in (8, 8, 8, 8, 6):
      step = jax.jit(functools.partial(steps.train_step_on_device_data, steps_per_epoch=spe, batch_size=8,
                                       size=size, augment=True, micro_batches=micro_batches))
      state, acc = step(state, acc, dataset.train_images, dataset.train_labels, perm, data_key)
    return state, acc

  state, acc = epoch(4)
  assert rel_err(float(acc['loss_sum'] / acc['count']), record['train_loss']) < parity.TRAJECTORY_RTOL
  want = torch_reference.torch_to_flax(model.state_dict())
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=parity.TRAJECTORY_RTOL, atol=1e-5),
               (state.params, state.batch_stats), (want['params'], want['batch_stats']))
  whole, _ = epoch(1)
  assert not np.allclose(np.asarray(whole.batch_stats['bn1']['var']),
                         np.asarray(state.batch_stats['bn1']['var']), rtol=1e-3)


# Runs ----------------------------------------------------------------------------------------------------


def _micro_config(**changes):
  """tests/conftest.py's tiny config (4 steps an epoch of 200, the last of 8) in micro-batches of 32."""
  config = tiny.get_config()
  config.num_epochs = 2
  config.optimizer.micro_batches = 2
  for name, value in changes.items():
    setattr(config, name, value)
  return config


@pytest.mark.slow  # end-to-end trainer runs, kept out of the default run's ~15 minutes
def test_k_seeds_and_a_resume_in_micro_batches(tmp_path):
  """Seed i of a k = 2 run in micro-batches trains as the single run of seed + i, within float32
  rounding; a run killed mid-epoch resumes bitwise."""
  config = _micro_config()
  singles = conftest.assert_k_seeds_train_as_singles_and_resume(config, tmp_path)
  # and the micro-batches mattered: BatchNorm's statistics of whole batches differ
  whole = config.copy_and_resolve_references()
  whole.optimizer.micro_batches = 1
  whole_state = train.train_and_evaluate(whole, str(tmp_path / 'whole'))
  assert not np.allclose(np.asarray(whole_state.batch_stats['bn1']['var']),
                         np.asarray(singles[0].batch_stats['bn1']['var']), rtol=1e-4)


def _run_and_save(spec_path: str) -> None:
  """The subprocess: trains each run of the spec and saves its final params and statistics."""
  with open(spec_path) as f:
    spec = json.load(f)
  for run in spec['runs']:
    config = _micro_config(parallelism=run['parallelism'])
    config.num_epochs = 1
    state = train.train_and_evaluate(config, run['workdir'])
    flat = {jax.tree_util.keystr(path): np.asarray(value) for path, value in
            jax.tree_util.tree_leaves_with_path((state.params, state.batch_stats))}
    np.savez(run['out'], **flat)


@pytest.mark.slow  # end-to-end trainer runs, kept out of the default run's ~15 minutes
def test_four_devices_in_micro_batches_match_one_device(tmp_path):
  """jit and pmap over 4 virtual CPU devices, each micro-batch of 32 split 8 a device (the last batch's
  micro-batches of 4, 1 a device), train what one device does, within tests/test_parallel.py's
  tolerance (float32 sums split over the devices)."""
  runs = [{'parallelism': mode, 'workdir': str(tmp_path / mode), 'out': str(tmp_path / f'{mode}.npz')}
          for mode in ('jit', 'pmap')]
  spec = tmp_path / 'spec.json'
  spec.write_text(json.dumps({'runs': runs}))
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(spec)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  config = _micro_config()
  config.num_epochs = 1
  one = train.train_and_evaluate(config, str(tmp_path / 'one'))
  want = {jax.tree_util.keystr(path): np.asarray(value) for path, value in
          jax.tree_util.tree_leaves_with_path((one.params, one.batch_stats))}
  for run in runs:
    with np.load(run['out'], allow_pickle=False) as got:
      assert sorted(got) == sorted(want)
      for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{run['parallelism']} {key}")


@pytest.mark.slow  # a range test and a run, kept out of the default run's ~15 minutes
def test_the_lr_range_test_steps_in_micro_batches():
  """`--mode=lr_find` runs the Program's train call, so its steps accumulate too: without BatchNorm the
  losses of 2 micro-batches are the whole batch's (up to rounding), with BatchNorm they differ."""
  def losses(norm, micro_batches):
    config = tiny.get_config()
    config.model.norm = norm
    config.data.synthetic_train_size = 128
    config.optimizer.micro_batches = micro_batches
    config.lr_find.start_lr, config.lr_find.end_lr = 1e-3, 0.3
    config.lr_find.num_steps = lr_curves.MIN_STEPS
    return np.array(lr_find.range_test(config, '', write=False)['per_seed'][0]['raw_loss'])

  group_norm = [losses('group_ws', n) for n in (1, 2)]
  assert len(group_norm[0]) == lr_curves.MIN_STEPS
  np.testing.assert_allclose(group_norm[1], group_norm[0], rtol=1e-4)
  batch_norm = [losses('batch', n) for n in (1, 2)]
  assert np.max(np.abs(batch_norm[1] - batch_norm[0])) > 1e-3


# Settings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('value, fragments', [
    (0, ('optimizer.micro_batches must be an integer >= 1', 'got 0')),
    (-2, ('optimizer.micro_batches must be an integer >= 1',)),
    (3, ('optimizer.micro_batches=3 does not divide batch_size=64', '2 or 4')),
    (128, ('optimizer.micro_batches=128 does not divide batch_size=64',)),
])
def test_bad_micro_batches_are_one_line(value, fragments):
  """Checked before anything compiles (config_lib.validate); the command line's one line and exit status
  2: tests/test_startup_checks.py."""
  config = tiny.get_config()
  config.optimizer.micro_batches = value
  with pytest.raises(ConfigError) as error:
    config_lib.validate(config)
  for fragment in fragments:
    assert fragment in str(error.value)


def test_automatic_cpu_devices_split_each_micro_batch():
  """cpu_devices=0 (one per core where the batch splits) counts the micro-batch: 96 in 32 micro-batches of
  3 splits over 3 devices of 4 cores, not 4 (as batch 96 alone would)."""
  config = tiny.get_config()
  config.model.conv, config.batch_size = 'xla', 96
  assert cpu_backend.auto_device_count(config, cores=4) == 4
  config.optimizer.micro_batches = 32
  assert cpu_backend.auto_device_count(config, cores=4) == 3
  config_lib.validate_devices(config, 3)


def test_micro_batches_must_split_over_the_devices():
  config = tiny.get_config()  # batch 64, 200 examples: a last batch of 8
  config.optimizer.micro_batches = 8  # micro-batches of 8
  config_lib.validate_devices(config, 4)
  config_lib.validate_devices(config, 8)
  with pytest.raises(ConfigError, match=r'micro-batches of 8 examples, which do not split over the 16 '
                                        r'devices.*micro_batches=4'):
    config_lib.validate_devices(config, 16)
  config.optimizer.micro_batches = 4  # the last batch's micro-batches of 2 split over 2 devices, not 4
  config_lib.check_micro_batch_split(config, 'pmap', 2, 200)
  config_lib.check_micro_batch_split(config, 'jit', 4, 200)  # jit runs them unsharded
  with pytest.raises(ConfigError, match=r'last batch of each epoch has 8 examples, whose micro-batches '
                                        r'\[2, 2, 2, 2\].*drop_remainder'):
    config_lib.check_micro_batch_split(config, 'pmap', 4, 200)


if __name__ == '__main__':
  _run_and_save(sys.argv[1])
