"""The trainer: a real train step, an end-to-end run that checkpoints and resumes exactly, the CLI."""

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

from cifar_jax import builders
from cifar_jax import input_pipeline
from cifar_jax import metrics_writer
from cifar_jax import program
from cifar_jax import steps
from cifar_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = metrics_writer.TIMING_KEYS


def _state(config, steps_per_epoch=4):
  model = builders.create_model(config.model)
  lr_fn, momentum_fn = builders.create_schedules(config, steps_per_epoch)
  return builders.create_train_state(jax.random.PRNGKey(0), config, model, lr_fn, momentum_fn)


def test_train_step_updates_params_and_batch_stats(tiny_config):
  state = _state(tiny_config)
  # ResNet9 at width 1/8 (widths 8/16/32/64): stem 216 + 16, stages 1184 + 3680 + 14528 + 57728,
  # fc 650 (conv kernels 9 * in * out, 1x1 shortcuts in * out, norms 2 * C).
  assert sum(x.size for x in jax.tree.leaves(state.params)) == 78_002
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
  y = jnp.arange(8) % 10
  step = jax.jit(chex.assert_max_traces(steps.train_step, n=1))
  new_state, metrics = step(state, (x, y))
  new_state, metrics = step(new_state, (x, y))  # no retrace
  assert int(new_state.step) == 2
  assert metrics['count'] == 8 and np.isfinite(metrics['loss_sum'])
  jax.tree.map(lambda a, b: chex.assert_equal_shape((a, b)), state.params, new_state.params)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
  assert all(jax.tree.leaves(changed))
  assert not np.allclose(state.batch_stats['bn1']['mean'], new_state.batch_stats['bn1']['mean'])
  np.testing.assert_allclose(new_state.opt_state.hyperparams['learning_rate'], 0.1)


def test_sgd_is_torch_sgd_with_coupled_weight_decay():
  """p -= lr * buf, buf = mu * buf + (g + wd * p): torch's SGD algebra, by hand."""
  tx = builders.sgd(learning_rate=0.1, momentum=0.9, weight_decay=0.01)
  p = {'w': jnp.asarray([1.0, -2.0])}
  opt_state = tx.init(p)
  buf = np.zeros(2)
  p_ref = np.array([1.0, -2.0])
  for g in ([0.5, 0.25], [-1.0, 2.0], [0.1, 0.1]):
    updates, opt_state = tx.update({'w': jnp.asarray(g)}, opt_state, p)
    p = jax.tree.map(jnp.add, p, updates)
    buf = 0.9 * buf + (np.array(g) + 0.01 * p_ref)
    p_ref = p_ref - 0.1 * buf
  np.testing.assert_allclose(p['w'], p_ref, rtol=1e-6)


def test_eval_masks_padding():
  images = np.zeros((5, 32, 32, 3), np.uint8)
  labels = np.arange(5, dtype=np.int32)
  x, y, m = steps.batched_eval_arrays(images, labels, 2)
  assert x.shape == (3, 2, 32, 32, 3) and m.sum() == 5 and m[-1, -1] == 0


def test_end_to_end_writes_metrics_checkpoints_and_resumes(tiny_config, tmp_path):
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(tiny_config, workdir)
  records = metrics_writer.read_metrics(workdir)
  assert [r['epoch'] for r in records] == [1, 2]
  spe = input_pipeline.steps_per_epoch(200, 64)  # 4 steps, the last of 8 images
  assert [r['step'] for r in records] == [spe, 2 * spe]
  for key in ('train_loss', 'train_accuracy', 'eval_loss', 'eval_accuracy', 'learning_rate',
              'momentum', 'images_per_second', 'elapsed_seconds'):
    assert key in records[-1] and np.isfinite(records[-1][key])
  assert 0.0 <= records[-1]['eval_accuracy'] <= 1.0
  assert records[0]['learning_rate'] == pytest.approx(0.1) and records[1]['learning_rate'] == (
      pytest.approx(0.01))  # smoke's MultiStep([1]) stepped per epoch
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [str(spe), str(2 * spe)]
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['name'] == 'resnet9'
  # Running again restores the final checkpoint and does not train.
  again = train.train_and_evaluate(tiny_config, workdir)
  assert int(again.step) == int(state.step) == 2 * spe
  chex.assert_trees_all_equal(again.params, state.params)
  assert len(metrics_writer.read_metrics(workdir)) == 2


def test_resume_mid_epoch_is_exact(tiny_config, tmp_path):
  """A run stopped after a mid-epoch checkpoint ends bitwise equal to an uninterrupted one."""
  tiny_config.checkpoint_every_steps = 3
  straight = train.train_and_evaluate(tiny_config, str(tmp_path / 'straight'))
  workdir = str(tmp_path / 'crashed')
  with pytest.raises(conftest.Crash):
    train.train_and_evaluate(tiny_config, workdir, actions=[conftest.StopAfter(6)])  # mid epoch 2
  resumed = train.train_and_evaluate(tiny_config, workdir)
  chex.assert_trees_all_equal(resumed.params, straight.params)
  chex.assert_trees_all_equal(resumed.batch_stats, straight.batch_stats)
  chex.assert_trees_all_equal(resumed.opt_state, straight.opt_state)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]
  assert strip(metrics_writer.read_metrics(workdir)) == strip(
      metrics_writer.read_metrics(str(tmp_path / 'straight')))


def test_group_ws_and_drop_remainder_train(tiny_config, tmp_path):
  tiny_config.model.norm = 'group_ws'
  tiny_config.num_epochs = 1
  tiny_config.data.drop_remainder = True
  state = train.train_and_evaluate(tiny_config, str(tmp_path / 'gn'))
  assert int(state.step) == 3 and state.batch_stats == {}


def _cli(*args, cwd=ROOT, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'cifar_jax.main', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_overrides_and_user_errors(tmp_path):
  workdir = str(tmp_path / 'cli')
  result = _cli('--config=configs/smoke.py', f'--workdir={workdir}', '--config.num_epochs=1',
                '--config.data.synthetic_train_size=128', '--config.progress_bar=False',
                '--config.optimizer.lr=0.02')
  assert result.returncode == 0, result.stderr[-2000:]
  records = metrics_writer.read_metrics(workdir)
  assert len(records) == 1 and records[0]['step'] == 2
  assert records[0]['learning_rate'] == pytest.approx(0.02)
  assert json.load(open(os.path.join(workdir, 'config.json')))['optimizer']['lr'] == 0.02

  result = _cli('--config=configs/smoke.py', f'--workdir={tmp_path / "bad"}',
                '--config.model.name=resnet50')
  assert result.returncode == 2
  assert 'model.name' in result.stderr and 'Traceback' not in result.stderr


def test_steps_in_call_stops_where_the_host_acts():
  every_4 = lambda done: done % 4 == 0
  assert program.steps_in_call(0, limit=10, max_steps=8, host_acts_after=every_4) == 4
  assert program.steps_in_call(4, limit=10, max_steps=8, host_acts_after=every_4) == 4
  assert program.steps_in_call(8, limit=10, max_steps=8, host_acts_after=every_4) == 2  # the limit
  assert program.steps_in_call(1, limit=10, max_steps=2, host_acts_after=lambda done: False) == 2
  assert program.steps_in_call(5, limit=10, max_steps=1, host_acts_after=lambda done: False) == 1


def test_several_steps_per_call_equal_one_step_per_call(tiny_config, tmp_path):
  """K steps per call run the same steps: the same params, metrics and checkpoints as one per call."""
  tiny_config.num_epochs = 2  # 4 steps an epoch, the last one a partial batch
  tiny_config.steps_per_dispatch = 1
  one = train.train_and_evaluate(tiny_config, str(tmp_path / 'one'))
  tiny_config.steps_per_dispatch = 8
  keep = conftest.KeepProgram()
  several = train.train_and_evaluate(tiny_config, str(tmp_path / 'several'), actions=[keep])
  # one compilation per batch size (full and partial), for any step count
  assert keep.program.traces['train'] == 2
  # each epoch: its 3 full batches in one call, then the partial one alone
  assert keep.program.calls == [3, 1, 3, 1]
  chex.assert_trees_all_close(several.params, one.params, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(several.batch_stats, one.batch_stats, rtol=1e-6, atol=1e-7)
  assert int(several.step) == int(one.step) == 8
  strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]
  for a, b in zip(strip(metrics_writer.read_metrics(str(tmp_path / 'several'))),
                  strip(metrics_writer.read_metrics(str(tmp_path / 'one')))):
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(a[k], float):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
      else:
        assert a[k] == b[k], k


def test_auto_steps_per_dispatch(tiny_config):
  assert tiny_config.steps_per_dispatch == 0
  assert program.steps_per_dispatch(tiny_config) == (
      program.CPU_STEPS_PER_DISPATCH if jax.default_backend() == 'cpu' else 1)
  assert program.steps_per_dispatch(tiny_config, num_devices=2) == 1
  assert program.dispatch_fn(1) is steps.one_step_on_device_data
  tiny_config.steps_per_dispatch = 3
  assert program.steps_per_dispatch(tiny_config) == 3
