"""Many seeds in one run: k vmap-ed models equal k single-seed runs, differ from each other, resume exactly.

Tolerance: seed i of a k = 3 run and the single run of `seed + i` draw the same batches from the same keys;
only the float rounding of the vmap-ed (batched) convolutions differs. Measured after 8 SGD steps (200
images, 2 epochs) of the tiny ResNet9 the largest differences are 1.2e-7 on params and 2.4e-7 on
BatchNorm statistics; the checks allow rtol 1e-5 + atol 1e-5, while a wrong key, batch or BatchNorm
axis moves values by 1e-3 or more.
"""

import os
import statistics
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # also run as a script: the two-device subprocess
  sys.path.insert(0, ROOT)

import conftest  # pylint: disable=g-import-not-at-top,wrong-import-position

from cifar_jax import builders  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import checkpointing  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import metrics_writer  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import steps  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

K = 3
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
TIMING_KEYS = metrics_writer.TIMING_KEYS


def _config(tiny_config, num_seeds: int = 1, seed: int = 0):
  """tiny_config on 192 images (2 epochs of 3 batches of 64), the same images for every seed."""
  tiny_config.num_seeds = num_seeds
  tiny_config.seed = seed
  tiny_config.data.synthetic_train_size = 192
  tiny_config.data.synthetic_seed = 0  # as in a k-seed run, whose seeds share the data
  tiny_config.checkpoint_every_steps = 2
  return tiny_config


def _seed(tree, i):
  return jax.tree.map(lambda x: np.asarray(x)[i], tree)


def _tiny():
  """tests/conftest.py's tiny_config, for the module-scoped run and the two-device subprocess."""
  from conftest import make_tiny_config  # pylint: disable=g-import-not-at-top
  return make_tiny_config()


@pytest.fixture(scope='module')
def k_run(tmp_path_factory):
  """A k = 3 run (seeds 0, 1, 2), with the number of times its train call was traced."""
  config = _config(_tiny(), K)
  workdir = str(tmp_path_factory.mktemp('seeds') / 'k3')
  keep = conftest.KeepProgram()
  state = train.train_and_evaluate(config, workdir, actions=[keep])
  return {'config': config, 'workdir': workdir, 'state': state, 'traces': keep.program.traces['train']}


def test_k_seeds_equal_k_single_runs(k_run, tiny_config, tmp_path):
  assert k_run['traces'] == 1  # one trace (one compilation) of the step for all seeds
  state = k_run['state']
  assert state.step.shape == (K,) and int(state.step[0]) == 6
  records = metrics_writer.read_metrics(k_run['workdir'])
  for i in range(K):
    config = _config(tiny_config.copy_and_resolve_references(), 1, seed=i)
    single = train.train_and_evaluate(config, str(tmp_path / f'seed_{i}'))
    chex.assert_trees_all_close(_seed(state.params, i), single.params, **TOLERANCE)
    chex.assert_trees_all_close(_seed(state.batch_stats, i), single.batch_stats, **TOLERANCE)
    chex.assert_trees_all_close(_seed(state.opt_state, i), single.opt_state, **TOLERANCE)
    single_records = metrics_writer.read_metrics(str(tmp_path / f'seed_{i}'))
    for record, single_record in zip(records, single_records):
      for key in ('train_loss', 'eval_loss', 'learning_rate'):
        values = record.get(f'{key}_per_seed', [record[key]] * K)
        assert values[i] == pytest.approx(single_record[key], rel=1e-5)
      for key in ('train_accuracy', 'eval_accuracy'):  # one example's flip at most
        assert abs(record[f'{key}_per_seed'][i] - single_record[key]) <= 1 / 64 + 1e-9


def test_seeds_differ_in_init_and_data_order(k_run):
  config = k_run['config']
  lr_fn, momentum_fn = builders.create_schedules(config, 4)
  initial = builders.create_seed_states(config, builders.create_model(config.model), lr_fn, momentum_fn)
  kernels = np.asarray(initial.params['conv1']['kernel'])
  final = np.asarray(k_run['state'].params['conv1']['kernel'])
  perms = [np.asarray(input_pipeline.epoch_permutation(builders.run_keys(i)[1], 0, 192)) for i in range(K)]
  for a in range(K):
    for b in range(a + 1, K):
      assert not np.allclose(kernels[a], kernels[b]) and not np.allclose(final[a], final[b])
      assert not np.array_equal(perms[a], perms[b])
  # Seed i's initialisation is the single run's: init from run_keys(seed + i).
  single = builders.create_train_state(builders.run_keys(1)[0], config, builders.create_model(config.model),
                                    lr_fn, momentum_fn)
  np.testing.assert_array_equal(kernels[1], single.params['conv1']['kernel'])


def test_metrics_hold_each_seed_mean_and_sample_std(k_run):
  records = metrics_writer.read_metrics(k_run['workdir'])
  assert [r['epoch'] for r in records] == [1, 2]
  for record in records:
    for key in ('train_loss', 'train_accuracy', 'eval_loss', 'eval_accuracy'):
      values = record[f'{key}_per_seed']
      assert len(values) == K
      assert record[f'{key}_mean'] == pytest.approx(statistics.fmean(values))
      assert record[key] == record[f'{key}_mean']
      assert record[f'{key}_std'] == pytest.approx(np.std(values, ddof=1))
  assert records[0]['learning_rate'] == pytest.approx(0.1)


def test_resume_mid_epoch_is_exact_and_refuses_another_num_seeds(k_run, tmp_path):
  """Stopped after the mid-epoch checkpoint at step 4 and resumed: bitwise the uninterrupted k-run."""
  config = k_run['config']
  workdir = str(tmp_path / 'crashed')
  with pytest.raises(conftest.Crash):
    train.train_and_evaluate(config, workdir, actions=[conftest.StopAfter(4)])

  other = config.copy_and_resolve_references()
  other.num_seeds = 2
  with pytest.raises(config_lib.ConfigError, match=r'num_seeds: 3 -> 2'):
    train.train_and_evaluate(other, workdir)

  resumed = train.train_and_evaluate(config, workdir)
  chex.assert_trees_all_equal(resumed.params, k_run['state'].params)
  chex.assert_trees_all_equal(resumed.batch_stats, k_run['state'].batch_stats)
  chex.assert_trees_all_equal(resumed.opt_state, k_run['state'].opt_state)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]
  assert strip(metrics_writer.read_metrics(workdir)) == strip(
      metrics_writer.read_metrics(k_run['workdir']))
  # The checkpoint evaluates per seed too.
  out = train.evaluate_checkpoint(config, workdir)
  assert len(out['eval_accuracy_per_seed']) == K


def test_vmapped_train_step_traces_once_and_is_each_seeds_step(tiny_config):
  """train_step vmap-ed over stacked states and per-seed batches: one trace, seed i's own step."""
  tiny_config.num_seeds = K
  model = builders.create_model(tiny_config.model)
  lr_fn, momentum_fn = builders.create_schedules(tiny_config, 4)
  states = builders.create_seed_states(tiny_config, model, lr_fn, momentum_fn)
  images = jax.random.normal(jax.random.PRNGKey(1), (K, 8, 32, 32, 3))
  labels = jnp.arange(K * 8).reshape(K, 8) % 10
  step = jax.jit(jax.vmap(chex.assert_max_traces(steps.train_step, n=1)))
  for _ in range(2):
    states, _ = step(states, (images, labels))  # no retrace
  single = builders.create_train_state(builders.run_keys(2)[0], tiny_config, model, lr_fn, momentum_fn)
  for _ in range(2):
    single, _ = jax.jit(steps.train_step)(single, (images[2], labels[2]))
  chex.assert_trees_all_close(_seed(states.params, 2), single.params, **TOLERANCE)
  chex.assert_trees_all_close(_seed(states.batch_stats, 2), single.batch_stats, **TOLERANCE)


def test_unsupported_layouts_are_one_line_errors(tiny_config):
  tiny_config.num_seeds = 2
  tiny_config.parallelism = 'pmap'
  with pytest.raises(config_lib.ConfigError, match='num_seeds=2 needs parallelism=jit'):
    config_lib.validate(tiny_config)
  tiny_config.parallelism = 'jit'
  tiny_config.num_seeds = 0
  with pytest.raises(config_lib.ConfigError, match='num_seeds must be a positive integer'):
    config_lib.validate(tiny_config)
  with pytest.raises(config_lib.ConfigError, match='seed_devices=3 must divide'):
    parallel.seed_mesh_shape(4, 3, 2)
  assert parallel.seed_mesh_shape(4, 0, 2) == (2, 1)
  assert parallel.seed_mesh_shape(3, 0, 2) == (1, 2)
  assert parallel.seed_mesh_shape(4, 1, 8) == (1, 8)


def test_resuming_an_old_single_seed_run_is_not_a_change(tmp_path, tiny_config):
  """config.json of runs from before num_seeds existed: the absent fields count as their defaults."""
  checkpointing.save_config(tiny_config, str(tmp_path))
  old = checkpointing.saved_config(str(tmp_path))
  for key in ('num_seeds', 'seed_devices'):
    del old[key]
  del old['data']['synthetic_seed']
  assert checkpointing.compare_with_saved(tiny_config, old) == ([], [])
  tiny_config.num_seeds = 2
  structural, _ = checkpointing.compare_with_saved(tiny_config, old)
  assert structural == ['num_seeds: 1 -> 2']


# Two devices: seeds split over the mesh, or each batch split; the device count is fixed when JAX starts,
# so these runs happen in a subprocess of this file with 2 virtual CPU devices.


def _two_device_worker(out_dir: str) -> None:
  import json  # pylint: disable=g-import-not-at-top
  results = {}
  for seed_devices in (2, 1):
    config = _config(_tiny(), 2)
    config.seed_devices = seed_devices
    state = train.train_and_evaluate(config, os.path.join(out_dir, f'seed_devices_{seed_devices}'))
    par = parallel.create('jit', num_seeds=2, seed_devices=seed_devices)
    results[seed_devices] = {'mesh': dict(par.mesh.shape),
                             'params_spec': list(jax.tree.leaves(state.params)[0].sharding.spec)}
    np.savez(os.path.join(out_dir, f'params_{seed_devices}.npz'),
             *[np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats))])
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f)


@pytest.mark.slow
def test_two_devices_split_seeds_or_batches_and_match_one_device(k_run, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.load(open(tmp_path / 'results.json'))
  assert results['2']['mesh'] == {'seeds': 2, 'data': 1} and results['1']['mesh'] == {'seeds': 1,
                                                                                       'data': 2}
  assert results['2']['params_spec'][0] == 'seeds'  # each device holds its own seed's params
  # Seeds 0 and 1 of the one-device k = 3 run.
  reference = [np.asarray(x)[:2] for x in jax.tree.leaves((k_run['state'].params,
                                                          k_run['state'].batch_stats))]
  for seed_devices in (2, 1):
    arrays = np.load(tmp_path / f'params_{seed_devices}.npz', allow_pickle=False)
    for i, expected in enumerate(reference):
      np.testing.assert_allclose(arrays[f'arr_{i}'], expected, **TOLERANCE)


if __name__ == '__main__':
  _two_device_worker(sys.argv[1])

