"""config.ema, the weights' exponential moving average (cifar_jax/ema.py): the trainer's average against a
numpy recomputation from the parameters it recorded, its evaluation row, export and shift rows, k seeds
and a resume, and the torch twin's `TorchEma` on the same batches."""

import functools
import json
import os

import conftest
import jax
import numpy as np
import pytest

from cifar_jax import builders
from cifar_jax import ema as ema_lib
from cifar_jax import input_pipeline
from cifar_jax import loop
from cifar_jax import steps
from cifar_jax import train
from configs import smoke
from configs import tiny

EMA_KEYS = {'ema_eval_loss', 'ema_eval_accuracy', 'ema_eval_ece', 'ema_eval_brier'}


def _host(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


class RecordVariables(loop.Action):
  """The params and BatchNorm statistics the run starts from and after each of its steps (each call is one
  step: the action is due after every step)."""

  def start(self, run) -> None:
    self.initial = _host((run.state.params, run.state.batch_stats))
    self.after = []

  def due(self, step: int) -> bool:
    return True

  def __call__(self, run) -> None:
    self.after.append(_host((run.state.params, run.state.batch_stats)))


def numpy_ema(initial, after, decay: float, warmup: bool, every: int, batch_stats: str):
  """timm's update by hand over the recorded (params, batch_stats) of each step, in float32."""
  ema_params, ema_stats = initial
  for step, (params, stats) in enumerate(after, start=1):
    if step % every:
      continue
    t = step // every - 1
    d = np.float32(min(decay, (1 + t) / (10 + t)) if warmup else decay)
    ema_params = jax.tree.map(lambda e, p, d=d: d * e + (np.float32(1) - d) * p, ema_params, params)
    if batch_stats == 'average':
      ema_stats = jax.tree.map(lambda e, p, d=d: d * e + (np.float32(1) - d) * p, ema_stats, stats)
    else:
      ema_stats = stats
  return ema_params, ema_stats


@pytest.mark.parametrize('batch_stats', ['average', pytest.param('copy', marks=pytest.mark.slow)])
def test_trainer_ema_equals_numpy_recomputation(tmp_path, batch_stats):
  """Two epochs of 4 steps (the last partial), an update after every 3rd step with the warm-up: the
  state's average equals timm's formula over the recorded parameters; each epoch logs ema_eval_*; the
  evaluation table's EMA row and the export are that average."""
  config = tiny.get_config()
  config.num_epochs = 2
  config.ema.enabled, config.ema.decay, config.ema.warmup = True, 0.9, True
  config.ema.every_steps, config.ema.batch_stats = 3, batch_stats
  recorder = RecordVariables()
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(config, workdir, actions=[recorder])
  assert len(recorder.after) == 8
  want = numpy_ema(recorder.initial, recorder.after, 0.9, True, 3, batch_stats)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
               _host((state.ema_params, state.ema_batch_stats)), want)
  # and it is not the running model
  assert not np.allclose(np.asarray(state.ema_params['fc']['kernel']),
                         np.asarray(state.params['fc']['kernel']))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 2 and all(EMA_KEYS <= set(r) for r in records)
  if batch_stats == 'copy':
    return
  out = train.evaluate_checkpoint(config, workdir)
  rows = {row['model']: row for row in out['table']}
  assert list(rows) == ['single model', 'EMA']
  assert rows['EMA']['accuracy'] == pytest.approx(records[-1]['ema_eval_accuracy'])
  assert rows['EMA']['nll'] == pytest.approx(records[-1]['ema_eval_loss'], rel=1e-5)
  assert rows['EMA']['ece'] == pytest.approx(records[-1]['ema_eval_ece'], rel=1e-5, abs=1e-7)
  assert out['ema_eval_accuracy'] == rows['EMA']['accuracy']
  exported = train.export_variables(config, workdir, use_swa=False, use_ema=True)
  jax.tree.map(np.testing.assert_array_equal, (exported['params'], exported['batch_stats']),
               _host((state.ema_params, state.ema_batch_stats)))


@pytest.mark.slow  # a trainer run and an evaluation under shift
def test_ema_rows_under_shift_and_beside_swa(tmp_path):
  """EMA and SWA in one run: the table has both rows, under shift the EMA row on every set, and after
  temperature scaling an EMA row too."""
  config = tiny.get_config()
  config.num_epochs = 2
  config.ema.enabled = True
  config.swa.enabled, config.swa.start_epoch = True, 1
  config.data.validation_size = 40  # temperature scaling fits T on a held-out split
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(config, workdir)
  assert int(state.swa_count) == 1 and state.ema_params is not None
  config.evaluation.shift, config.evaluation.severities, config.evaluation.shift_cache = 'fog', (1,), ''
  config.evaluation.temperature = True
  out = train.evaluate_checkpoint(config, workdir)
  assert [row['model'] for row in out['table']] == ['single model', 'SWA', 'EMA']
  assert [row['model'] for row in out['temperature']['rows']] == ['single model', 'SWA', 'EMA']
  assert [(row['model'], row['corruption']) for row in out['shift']['rows']] == [
      ('single model', 'fog'), ('SWA', 'fog'), ('EMA', 'fog')]
  assert {row['model'] for row in out['shift']['summary']} == {'single model', 'SWA', 'EMA'}


@pytest.mark.slow  # five trainer runs
def test_k_seeds_and_a_resume_average_as_the_single_run(tmp_path):
  """Seed i of a k = 2 run keeps the single run's average (within float32 rounding); a run killed
  mid-epoch resumes it bitwise (tests/conftest.py compares the EMA's fields too)."""
  config = tiny.get_config()
  config.num_epochs = 2
  config.ema.enabled, config.ema.decay = True, 0.8
  singles = conftest.assert_k_seeds_train_as_singles_and_resume(config, tmp_path)
  assert not np.allclose(np.asarray(singles[0].ema_params['fc']['kernel']),
                         np.asarray(singles[0].params['fc']['kernel']))
  # the k = 2 run's table: each seed's average and their ensemble
  k_config = config.copy_and_resolve_references()
  k_config.num_seeds, k_config.data.synthetic_train_size, k_config.data.synthetic_seed = 2, 128, 0
  out = train.evaluate_checkpoint(k_config, str(tmp_path / 'k2'))
  assert [row['model'] for row in out['table']] == ['single model', 'deep ensemble', 'EMA', 'EMA ensemble']
  assert len(out['ema_eval_accuracy_per_seed']) == 2 and 'EMA ensemble' in out['nll_by_models']
  with open(os.path.join(tmp_path / 'k2', 'metrics.jsonl')) as f:
    last = [json.loads(line) for line in f][-1]
  assert len(last['ema_eval_ece_per_seed']) == 2 and 'ema_ensemble_eval_nll' in last


def test_update_ema_every_steps_and_copy():
  """`update_ema` on a hand-made state: nothing until the step is a multiple of every_steps, then timm's
  formula; 'copy' takes the running statistics."""
  state = steps.TrainState(step=np.int32(1), apply_fn=None, params={'w': np.ones(3, np.float32)},
                           tx=None, opt_state=None, batch_stats={'m': np.full(3, 2.0, np.float32)})
  state = ema_lib.init_ema(state).replace(params={'w': np.full(3, 3.0, np.float32)},
                                          batch_stats={'m': np.full(3, 4.0, np.float32)})
  e = ema_lib.Ema(decay=0.5, every_steps=2, batch_stats='copy')
  same = ema_lib.update_ema(state, e)
  np.testing.assert_array_equal(same.ema_params['w'], 1.0)
  np.testing.assert_array_equal(same.ema_batch_stats['m'], 2.0)
  moved = ema_lib.update_ema(state.replace(step=np.int32(2)), e)
  np.testing.assert_allclose(moved.ema_params['w'], 2.0)
  np.testing.assert_array_equal(moved.ema_batch_stats['m'], 4.0)
  assert float(ema_lib.decay_at(ema_lib.Ema(decay=0.99, warmup=True), 0)) == pytest.approx(0.1)
  assert float(ema_lib.decay_at(ema_lib.Ema(decay=0.99, warmup=True), 10_000)) == pytest.approx(0.99)


def test_torch_twin_ema_equals_jax_after_an_epoch(tmp_path):
  """One epoch of 5 steps in 'identical' mode from the same weights: the twin's `TorchEma` (updated after
  every 2nd step, with the warm-up) equals the trainer's average within float32 rounding; the twin's
  per-epoch record has the trainer's ema_eval_* keys."""
  torch = pytest.importorskip('torch')
  import test_torch_parity as parity  # pylint: disable=g-import-not-at-top (needs torch)

  from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top

  config = smoke.get_config()
  config.num_epochs, config.batch_size = 1, 8
  config.model.width_multiplier = parity.WIDTH
  config.data.synthetic_train_size, config.data.synthetic_eval_size = 36, 8
  config.ema.enabled, config.ema.decay, config.ema.warmup, config.ema.every_steps = True, 0.7, True, 2
  dataset = input_pipeline.load_dataset(config.data, config.seed)
  torch.manual_seed(0)
  model = torch_reference.create_torch_model(config.model)
  variables = torch_reference.torch_to_flax(model.state_dict())
  optimizer = torch_reference.create_torch_optimizer(model.parameters(), config.optimizer)
  torch_ema = torch_reference.TorchEma(model, ema_lib.from_config(config))
  batches = torch_reference.torch_batches(dataset, config, 0, 'identical')
  torch_reference.train_epoch(model, optimizer, batches, 'cpu',
                              after_step=lambda i: torch_ema.after_step(model))
  assert torch_ema.steps == 5

  n, spe = dataset.num_train, 5
  lr_fn, momentum_fn = builders.create_schedules(config, spe)
  state = builders.create_train_state(jax.random.key(0), config, builders.create_model(config.model),
                                      lr_fn, momentum_fn)
  state = ema_lib.init_ema(state.replace(params=variables['params'], batch_stats=variables['batch_stats']))
  data_key = torch_reference.jax_data_key(config.seed)
  perm = input_pipeline.epoch_permutation(data_key, 0, n)
  acc = steps.init_train_metrics()
  jitted = {size: jax.jit(functools.partial(steps.train_step_on_device_data, steps_per_epoch=spe,
                                            batch_size=8, size=size, augment=True,
                                            ema=ema_lib.from_config(config))) for size in (8, 4)}
  for size in (8, 8, 8, 8, 4):
    state, acc = jitted[size](state, acc, dataset.train_images, dataset.train_labels, perm, data_key)
  want = torch_reference.torch_to_flax(torch_ema.module.state_dict())
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=parity.TRAJECTORY_RTOL, atol=1e-5),
               (state.ema_params, state.ema_batch_stats), (want['params'], want['batch_stats']))
  running = torch_reference.torch_to_flax(model.state_dict())
  assert not np.allclose(want['params']['fc']['kernel'], running['params']['fc']['kernel'], rtol=1e-3)

  _, record = torch_reference.train_and_evaluate_torch(config, str(tmp_path / 'twin'), 'identical',
                                                        device='cpu', dataset=dataset)
  assert EMA_KEYS <= set(record) and 0.0 <= record['ema_eval_accuracy'] <= 1.0


def test_init_from_weights_start_the_average_too():
  """`config.init_from`'s weights replace the initial params and the EMA's copy of them, two seeds alike
  (pretrained.initialize); the average's arrays are its own (the first step donates both)."""
  from cifar_jax import pretrained  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  config.ema.enabled, config.num_seeds = True, 2
  model = builders.create_model(config.model)
  state, acc = builders.create_initial_state(config, model, builders.create_run_schedules(config, 4))
  kernel = np.full(np.shape(state.params['fc']['kernel'])[1:], 0.25, np.float32)
  state, _ = pretrained.initialize((state, acc), ({('params', ('fc', 'kernel')): kernel}, {}), 2)
  for tree in (state.params, state.ema_params):
    np.testing.assert_array_equal(np.asarray(tree['fc']['kernel']),
                                  np.broadcast_to(kernel, (2,) + kernel.shape))
  assert state.ema_params['fc']['kernel'] is not state.params['fc']['kernel']


def test_a_run_saved_before_the_ema_fields_resumes_quietly():
  """config.json of a run from before config.ema: nothing announced; turning the average on is refused (the
  checkpoint has no average to resume)."""
  from cifar_jax import checkpointing  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  saved = json.loads(config.to_json_best_effort())
  del saved['ema']
  assert checkpointing.compare_with_saved(config, saved) == ([], [])
  config.ema.enabled, config.ema.decay = True, 0.9
  assert checkpointing.compare_with_saved(config, saved) == (
      ['ema.enabled: False -> True'], ['ema.decay: 0.999 -> 0.9'])
