"""Faults: SIGKILL at any moment then the same command, SIGTERM, a diverging run, incompatible and
damaged checkpoints. Bitwise comparisons: a resumed run regenerates every batch from (seed, epoch, step)
and restores every array exactly, so nothing may differ."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from cifar_jax import config_lib
from cifar_jax import loop
from cifar_jax import metrics_writer
from cifar_jax import preemption
from cifar_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = metrics_writer.TIMING_KEYS
# ResNet9 of width 1/8 on 320 synthetic images: 5 steps an epoch, 3 epochs, a checkpoint every 2 steps.
ARGS = ['--config=configs/smoke.py', '--config.model.width_multiplier=0.125', '--config.num_epochs=3',
        '--config.data.synthetic_train_size=320', '--config.data.synthetic_eval_size=64',
        '--config.checkpoint_every_steps=2', '--config.progress_bar=False']


def _cmd(workdir, *extra):
  return [sys.executable, '-m', 'cifar_jax.main', f'--workdir={workdir}', *ARGS, *extra]


def _env():
  return dict(os.environ, JAX_PLATFORMS='cpu')


def _strip(records):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _final_arrays(workdir):
  from configs import smoke  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.model.width_multiplier = 0.125
  config.num_epochs = 3
  config.data.synthetic_train_size = 320
  state = train.restore_state(config, workdir, steps_per_epoch=5)
  return state.params, state.batch_stats, state.opt_state


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  result = subprocess.run(_cmd(workdir), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


def _wait_for_step(workdir, proc, min_records=0, timeout=300):
  start = time.time()
  ckpt = os.path.join(workdir, 'checkpoints')
  while time.time() - start < timeout:
    if proc.poll() is not None:
      return False
    done = os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))
    if done and len(metrics_writer.read_metrics(workdir)) >= min_records:
      return True
    time.sleep(0.05)
  return False


@pytest.mark.parametrize('seed', [0, pytest.param(1, marks=pytest.mark.slow),
                                  pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_then_same_command_is_bitwise_equal(uninterrupted, tmp_path, seed):
  """SIGKILL after a random delay once training runs (mid-step, mid-save or mid-eval), then resume."""
  workdir = str(tmp_path / 'killed')
  proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  assert _wait_for_step(workdir, proc, min_records=0)
  time.sleep(np.random.default_rng(seed).uniform(0.0, 2.0))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  result = subprocess.run(_cmd(workdir), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert _strip(metrics_writer.read_metrics(workdir)) == _strip(metrics_writer.read_metrics(uninterrupted))
  chex.assert_trees_all_equal(_final_arrays(workdir), _final_arrays(uninterrupted))


def test_sigterm_checkpoints_and_says_how_to_resume(uninterrupted, tmp_path):
  workdir = str(tmp_path / 'term')
  proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  assert _wait_for_step(workdir, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  if proc.returncode == 0:
    pytest.skip('the run finished before the signal arrived')
  assert proc.returncode == 128 + signal.SIGTERM
  assert 'stopped by SIGTERM at step' in stderr and 'run the same command to resume' in stderr
  result = subprocess.run(_cmd(workdir), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  chex.assert_trees_all_equal(_final_arrays(workdir), _final_arrays(uninterrupted))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
  tiny_config.num_epochs = 2
  train.train_and_evaluate(tiny_config, str(tmp_path))  # a good run to epoch 2's end...
  tiny_config.num_epochs = 6
  tiny_config.optimizer.lr = 1e12  # ...then diverge while continuing it
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(tiny_config, str(tmp_path))
  match = re.search(r'non-finite training loss or parameters at step (\d+) \(epoch (\d+)\)', str(error.value))
  assert match, str(error.value)
  bad_step, bad_epoch = int(match.group(1)), int(match.group(2))
  assert bad_epoch == (bad_step - 1) // 4 + 1  # 4 steps per epoch
  saved = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints'))
  assert saved and max(saved) < bad_step  # nothing written at or after the bad step
  state = train.restore_state(tiny_config, str(tmp_path), steps_per_epoch=4)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_incompatible_checkpoint_is_refused(tiny_config, tmp_path):
  tiny_config.num_epochs = 1
  train.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.model.width_multiplier = 0.25
  with pytest.raises(config_lib.ConfigError, match=r'model.width_multiplier: 0.125 -> 0.25'):
    train.train_and_evaluate(tiny_config, str(tmp_path))


def test_changed_field_is_announced(tiny_config, tmp_path, caplog):
  tiny_config.num_epochs = 1
  train.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.num_epochs = 2
  train.train_and_evaluate(tiny_config, str(tmp_path))
  assert 'num_epochs: 1 -> 2' in caplog.text


def test_damaged_checkpoint_falls_back_to_the_previous_one(tiny_config, tmp_path):
  tiny_config.num_epochs = 2
  straight = train.train_and_evaluate(tiny_config, str(tmp_path / 'straight'))
  workdir = tmp_path / 'damaged'
  train.train_and_evaluate(tiny_config, str(workdir))
  latest = workdir / 'checkpoints' / str(max(int(d) for d in os.listdir(workdir / 'checkpoints')))
  for root, _, files in os.walk(latest / 'state'):
    for name in files:
      if 'ocdbt' in root or name.startswith('d'):
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'garbage')
  shutil.rmtree(workdir / 'checkpoints' / str(max(int(d) for d in os.listdir(workdir / 'checkpoints'))) /
                'state' / 'manifest.ocdbt', ignore_errors=True)
  tiny_config.num_epochs = 2
  resumed = train.train_and_evaluate(tiny_config, str(workdir))  # re-trains the last epoch
  chex.assert_trees_all_equal(resumed.params, straight.params)


class SigtermDuringCall(loop.Action):
  """Sends SIGTERM to this process while the train call that ends at `step` runs, as a job scheduler
  would; the run's StopRequest catches it (it is not due anywhere itself)."""

  def __init__(self, step: int):
    self.step = step

  def start(self, run) -> None:
    train_call = run.program.train_call

    def call_then_signal(state, acc, perm, step, host_acts_after):
      state, acc, k = train_call(state, acc, perm, step, host_acts_after)
      if step + k == self.step:
        signal.raise_signal(signal.SIGTERM)
      return state, acc, k

    run.program.train_call = call_then_signal

  def due(self, step: int) -> bool:
    return False


@pytest.mark.parametrize('stop_at', [6, 4])
def test_sigterm_where_a_per_step_swa_update_is_due_resumes_bitwise(tiny_config, tmp_path, stop_at):
  """SIGTERM lands in the call that ends at step 6 (mid epoch 2), where swa.update_every_steps=2 makes an
  SWA update due (and at step 4, an epoch's end): the update is made before the checkpoint, so the resumed
  run ends bitwise equal to an uninterrupted one."""
  tiny_config.num_epochs = 3  # 4 steps an epoch; SWA from epoch 2, updates after steps 6, 8, 10, 12
  tiny_config.swa.update(enabled=True, start_epoch=1, update_every_steps=2)
  straight = train.train_and_evaluate(tiny_config, str(tmp_path / 'straight'))
  workdir = str(tmp_path / 'term')
  with pytest.raises(preemption.Preempted) as stopped:
    train.train_and_evaluate(tiny_config, workdir, actions=[SigtermDuringCall(stop_at)])
  assert stopped.value.step == stop_at
  resumed = train.train_and_evaluate(tiny_config, workdir)
  assert int(resumed.swa_count) == int(straight.swa_count) == 4
  for field in ('params', 'batch_stats', 'opt_state', 'swa_params', 'swa_batch_stats', 'swa_count'):
    chex.assert_trees_all_equal(getattr(resumed, field), getattr(straight, field))
  assert _strip(metrics_writer.read_metrics(workdir)) == _strip(
      metrics_writer.read_metrics(str(tmp_path / 'straight')))
