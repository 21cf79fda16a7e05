"""A training run, top to bottom: load the data, build the model and state, restore, compile, loop.

`train_and_evaluate(config, workdir)` is the whole run: builders (`builders.py`) turn the config into a
model, schedules and the initial state; `checkpointing.py` restores the latest checkpoint; `program.py`
compiles every function of the run; `loop.py` calls them and runs the host's actions between calls
(docs/architecture.md). `evaluate_checkpoint` and `export_variables` use a finished (or partial) run.
"""

import concurrent.futures
import os

from absl import logging
import jax
import ml_collections
import numpy as np

from cifar_jax import builders
from cifar_jax import calibration
from cifar_jax import checkpointing
from cifar_jax import compilation_cache
from cifar_jax import config_lib
from cifar_jax import corruptions
from cifar_jax import ema as ema_lib
from cifar_jax import input_pipeline
from cifar_jax import loop
from cifar_jax import metrics_writer
from cifar_jax import onednn_conv
from cifar_jax import parallel
from cifar_jax import pretrained
from cifar_jax import program as program_lib
from cifar_jax import steps
from cifar_jax import swag
from cifar_jax import timing
from cifar_jax import uncertainty
from cifar_jax import workdir_lock
from cifar_jax.errors import ConfigError
from cifar_jax.errors import NonFiniteLossError  # noqa: F401 (public: train.NonFiniteLossError)

# Public names people import from here.
TrainState = steps.TrainState
restore_state = checkpointing.restore_state
unstack_seed = steps.unstack_seed


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       actions: list | tuple = ()) -> steps.TrainState:
  """Trains `config` into `workdir`, resuming from its latest checkpoint; returns the final state.

  Runs data-parallel over all devices (of all processes, when `config.distributed` or the JAX_*
  variables configure several) as `config.parallelism` says; see cifar_jax/parallel.py.

  Args:
    config: a config as in configs/default.py.
    workdir: where checkpoints, metrics.jsonl, TensorBoard events and config.json go.
    actions: more host actions (cifar_jax/loop.py), run after the default ones when due.

  Returns:
    The final TrainState, its arrays replicated over the devices (under pmap too: no device axis).
  """
  laps = timing.Laps()
  imports = timing.seconds_before_run()
  config_lib.validate(config)
  parallel.initialize_distributed(config.distributed)
  compilation_cache.configure(config.compilation_cache)
  if jax.process_index() == 0:  # a held workdir stops the run before its data is read
    workdir_lock.check_free(workdir)
  # The data before the pretrained weights: its class count is the model's head's.
  dataset = input_pipeline.load_dataset(config.data, config.seed)
  logging.info('Data: %d train, %d %s examples, %d classes', dataset.num_train, dataset.num_eval,
               dataset.eval_split, dataset.num_classes)
  laps.lap('data')
  # Pretrained weights are read and checked before anything is written; a resumed run ignores them.
  init = None
  if config.get('init_from') is not None and config.init_from.path:
    if pretrained.has_checkpoint(workdir):
      logging.info('Resuming %s from its checkpoint; init_from.path=%s is not read.', workdir,
                   config.init_from.path)
    else:
      init = pretrained.load(config, dataset.num_classes)
  os.makedirs(workdir, exist_ok=True)
  # One writer per workdir, taken before anything reads or writes its checkpoints or metrics.
  with workdir_lock.WorkdirLock(workdir, hold=jax.process_index() == 0):
    return _train_and_evaluate(config, workdir, actions, laps, imports, dataset, init)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, actions, laps: timing.Laps,
                        imports: float, dataset: input_pipeline.Dataset, init=None) -> steps.TrainState:
  """`train_and_evaluate` once the workdir is this run's; `init`: `pretrained.load`'s, or None."""
  par = parallel.create(config.parallelism, num_seeds=config.num_seeds, seed_devices=config.seed_devices)
  logging.info('parallelism=%s: batch %d over %d devices (%d processes)', par.mode,
               config.batch_size, par.data_devices, jax.process_count())
  if config.num_seeds > 1:
    logging.info('%d seeds (%d..%d) in one vmap-ed step, mesh %s', config.num_seeds, config.seed,
                 config.seed + config.num_seeds - 1, dict(par.mesh.shape))
  laps.lap('devices')
  spe = config_lib.steps_per_epoch(config, par, dataset.num_train)
  config_lib.validate_against_run(config, spe)

  run_schedules = builders.create_run_schedules(config, spe)
  model = builders.create_model(config.model, par.num_devices, par.mode, axis_name=par.axis_name,
                                num_classes=dataset.num_classes)
  initial = builders.initial_state_fn(config, model, run_schedules)
  manager = checkpointing.checkpoint_manager(workdir, config)
  checkpoints = checkpointing.CheckpointWriter(manager)
  changed = checkpointing.check_resume(config, workdir, bool(manager.all_steps()))
  checkpointing.check_num_classes(manager, workdir, dataset.num_classes)
  if changed and par.is_main_process:
    logging.warning('Resuming %s with a config that differs from the one it started with: %s',
                    workdir, '; '.join(changed))
  shapes = par.abstract_per_seed(initial.shapes())
  if par.is_main_process:
    logging.info('Model: %s, %s parameters', config.model.name,
                 f'{builders.parameter_count(initial.shapes()[0].params):,}')
  if config.swag.enabled:  # before the state exists
    swag.check_memory(config.swag, shapes[0].params, config.num_seeds)
  laps.lap('init')

  # The first train call compiles for the state's shapes while a thread computes the initial state
  # (its initialisers compile and run in XLA beside). Checkpoints hold the state replicated over the
  # devices, whatever their number; the steps take it in their layout. With several seeds every per-seed
  # tree has a leading seed axis, split over 'seeds'.
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    fresh = pool.submit(lambda: par.place_per_seed(pretrained.initialize(initial.compute(), init,
                                                                         config.num_seeds)))
    program = program_lib.Program.compile(config, model, par, dataset, *shapes,
                                          *builders.seed_data_keys(config),
                                          first_step=max(manager.all_steps(), default=0))
    laps.lap('compile')
    state, acc = fresh.result()
  restored = checkpointing.restore_checkpoint(manager, par.to_checkpoint_layout(state),
                                              par.to_checkpoint_layout(acc))
  extra = {}
  if restored is not None:
    state, acc, extra = restored
    state, acc = par.to_step_layout(state), par.to_step_layout(acc)
    checkpointing.load_plateaus(run_schedules.plateaus, extra)
  start_step = checkpointing.scalar(par.host(state.step))
  writer = None
  if par.is_main_process:
    writer = metrics_writer.MetricsWriter(workdir, truncate_after_step=start_step)
    checkpointing.save_config(config, workdir)
  num_steps = config.num_epochs * spe
  if start_step >= num_steps:
    logging.info('Run in %s already finished (step %d of %d); nothing to do.', workdir, start_step,
                 num_steps)
    if par.is_main_process:
      print(f'{workdir}: training already finished at step {start_step}/{num_steps}; nothing to do.')
      writer.close()
    checkpoints.close()
    return _returned(par, state, config, dataset.num_classes)
  if start_step:
    logging.info('Resuming from step %d (epoch %d).', start_step, start_step // spe)
  logging.info('Convolutions: %s (model.conv=%s, model.dtype=%s); up to %d train steps per call.',
               onednn_conv.describe(model.conv_impl, model.dtype), config.model.get('conv', 'auto'),
               config.model.dtype, program.max_steps_per_call)
  laps.lap('init')
  startup = imports + sum(laps.seconds.values())
  logging.info('Start-up %.1f s before the first step: imports %.1f, devices %.1f, data %.1f, init %.1f, '
               'compile %.1f (batch sizes %s; compilation cache: %s).', startup, imports,
               *(laps.seconds[k] for k in ('devices', 'data', 'init', 'compile')),
               sorted(set(program.sizes)), jax.config.jax_compilation_cache_dir or 'off')
  run = loop.Run(config=config, workdir=workdir, program=program, state=state, acc=acc,
                 checkpoints=checkpoints, writer=writer, plateaus=run_schedules.plateaus,
                 start_step=start_step, elapsed_before=float(extra.get('elapsed_seconds', 0.0)),
                 startup_seconds=startup)
  try:
    loop.run_loop(run, loop.default_actions(config, spe) + list(actions))
  finally:  # however the loop ends (a signal, a NaN, a failed write), the last save is committed or failed
    checkpoints.close()
  if writer is not None:
    writer.close()
  return _returned(par, run.state, config, dataset.num_classes)


def _returned(par: parallel.Parallel, state: steps.TrainState, config,
              num_classes: int) -> steps.TrainState:
  """The state without pmap's device axis, applying a model without pmap's collective axis."""
  return par.to_checkpoint_layout(state).replace(
      apply_fn=builders.create_model(config.model, num_classes=num_classes).apply)


# Using a finished (or partial) run ---------------------------------------------------------------------


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The latest checkpoint's eval metrics, and the table of every model it holds.

  Keys: eval_loss and eval_accuracy of the running model and, when present, swa_eval_* of the SWA model
  and ema_eval_* of the weights' moving average (config.ema) (per seed with several), and `table`: one
  row per model (`evaluation_rows`) with accuracy, NLL, ECE, Brier and the reliability diagram's bins.
  SWAG draws `config.swag.num_samples` samples per seed (a --config.swag.num_samples=... given here
  overrides the training run's). With `config.evaluation.shift`, `shift` holds every row's metrics on
  each corruption and severity (`evaluate_shift`); with `evaluation.temperature`, `temperature` every
  row's after temperature scaling, and with `evaluation.ood`, `ood` every row's OOD detection
  (`uncertainty.evaluate`).
  """
  config_lib.validate(config)
  compilation_cache.configure(config.compilation_cache)
  par = parallel.create(config.parallelism, num_seeds=config.num_seeds, seed_devices=config.seed_devices)
  dataset = input_pipeline.load_dataset(config.data, config.seed)
  manager = checkpointing.checkpoint_manager(workdir, config, read_only=True)
  checkpointing.check_num_classes(manager, workdir, dataset.num_classes)
  shifted = shifted_sets(config, dataset)  # before anything compiles: a bad released file stops here
  ood_sets = uncertainty.load_ood_sets(config, dataset)  # so does a bad OOD set
  fit_temperature = uncertainty.wanted(config)[0]
  spe = input_pipeline.steps_per_epoch(dataset.num_train, config.batch_size, config.data.drop_remainder)
  model = builders.create_model(config.model, par.num_devices, par.mode, axis_name=par.axis_name,
                                num_classes=dataset.num_classes)
  state, acc = par.place_per_seed(builders.create_initial_state(
      config, model, builders.create_run_schedules(config, spe)))
  restored = checkpointing.restore_checkpoint(
      manager, par.to_checkpoint_layout(state),
      par.to_checkpoint_layout(acc), move_damaged=False)  # a reader: the workdir may be a live run's
  if restored is None:
    raise ConfigError(f'--workdir={workdir}: no checkpoint under {workdir}/checkpoints')
  state, acc = par.to_step_layout(restored[0]), par.to_step_layout(restored[1])
  program = program_lib.Program.compile(config, model, par, dataset, state, acc,
                                        *builders.seed_data_keys(config), training=False,
                                        log_probs=fit_temperature or bool(ood_sets),
                                        member_entropy=bool(ood_sets))
  k = config.num_seeds
  step = checkpointing.scalar(par.host(state.step))
  count = 0 if state.swa_count is None else checkpointing.scalar(par.host(state.swa_count))
  out = {'step': step, 'split': dataset.eval_split}
  rows, curves = [], {}
  _, labels, mask = program.data['eval_arrays']
  for prefix, use_swa in (('', False), ('swa_', True))[:1 + (count > 0)]:
    sums, ensemble, log_probs = program.evaluate_members(state, use_swa=use_swa)
    ev = steps.seed_summaries(par.host(sums), k)
    out.update(**steps.seed_metrics(f'{prefix}eval_loss', [e['loss'] for e in ev]),
               **steps.seed_metrics(f'{prefix}eval_accuracy', [e['accuracy'] for e in ev]))
    names = ('SWA', 'MultiSWA') if use_swa else ('single model', 'deep ensemble')
    rows += evaluation_rows(names, par.host(sums), ensemble, k, 1)
    if k > 1:
      curves[names[1]] = ensemble_curve([(1, log_probs)], labels, mask, k)
  if state.ema_params is not None:  # config.ema: the weights' moving average
    sums, ensemble, log_probs = program.evaluate_members(state, use_ema=True)
    ev = steps.seed_summaries(par.host(sums), k)
    out.update(**steps.seed_metrics('ema_eval_loss', [e['loss'] for e in ev]),
               **steps.seed_metrics('ema_eval_accuracy', [e['accuracy'] for e in ev]))
    rows += evaluation_rows(ema_lib.NAMES, par.host(sums), ensemble, k, 1)
    if k > 1:
      curves[ema_lib.NAMES[1]] = ensemble_curve([(1, log_probs)], labels, mask, k)
  if count > 0:
    out['swa_count'] = count
    if config.swag.enabled:
      swag.log_divisor(count, config.swag.rank)
      sums, ensemble, partial = program.swag_evaluate(state, max(step - 1, 0) // spe,
                                                      config.swag.num_samples)
      rows += evaluation_rows(('SWAG', 'MultiSWAG'), par.host(sums), ensemble, k, config.swag.num_samples)
      curves['MultiSWAG' if k > 1 else 'SWAG'] = ensemble_curve(partial, labels, mask, k)
  out['table'] = rows
  out['nll_by_models'] = curves
  if shifted:
    out['shift'] = evaluate_shift(config, program, state, dataset, shifted, max(step - 1, 0) // spe,
                                  swag_on=count > 0 and config.swag.enabled, swa_on=count > 0)
  if fit_temperature or ood_sets:
    out.update(uncertainty.evaluate(config, program, state, dataset, ood_sets, max(step - 1, 0) // spe,
                                    swa_on=count > 0, swag_on=count > 0 and config.swag.enabled))
  return out


def shifted_sets(config: ml_collections.ConfigDict, dataset: input_pipeline.Dataset) -> list:
  """[(corruption, severity, images)] of `config.evaluation.shift` ([] without it): the released files of
  data.corruptions_path (DataError for a missing, corrupt or mis-shaped one), else generated from the
  evaluation images and cached."""
  if 'evaluation' not in config or not corruptions.selected(config.evaluation.shift):
    return []
  ev = config.evaluation
  return corruptions.shifted_sets(
      dataset.eval_images, dataset.eval_labels, corruptions.selected(ev.shift),
      tuple(int(s) for s in ev.severities), corruptions_path=config.data.get('corruptions_path', ''),
      seed=ev.shift_seed, cache=corruptions.cache_dir(ev.shift_cache))


def evaluate_shift(config: ml_collections.ConfigDict, program: program_lib.Program, state,
                   dataset: input_pipeline.Dataset, sets: list, epoch: int, swag_on: bool,
                   swa_on: bool) -> dict:
  """The evaluation table's rows on each of `sets` (`shifted_sets`): {'source',
  'corruptions', 'severities', 'rows' (corruption, severity and a table row without its bins),
  'summary' (per model and severity the mean over the corruptions; over the 15 of the benchmark when they
  are among them, `summary_corruptions`)}. The same compiled functions as the clean table (the sets have
  its shapes); SWAG's samples are drawn and recalibrated once for every set."""
  ev, par, k = config.evaluation, program.par, config.num_seeds
  names, severities = corruptions.selected(ev.shift), tuple(int(s) for s in ev.severities)
  path = config.data.get('corruptions_path', '')
  arrays = [par.shard_eval_arrays(steps.batched_eval_arrays(images, dataset.eval_labels,
                                                            config.eval_batch_size, par.eval_batch_multiple))
            for _, _, images in sets]
  rows = [[] for _ in sets]
  for prefix_names, use_swa, use_ema in ((('single model', 'deep ensemble'), False, False),
                                         (('SWA', 'MultiSWA'), True, False), (ema_lib.NAMES, False, True)):
    if (use_swa and not swa_on) or (use_ema and state.ema_params is None):
      continue
    for i, eval_arrays in enumerate(arrays):
      sums, ensemble, _ = program.evaluate_members(state, use_swa=use_swa, eval_arrays=eval_arrays,
                                                   use_ema=use_ema)
      rows[i] += evaluation_rows(prefix_names, par.host(sums), ensemble, k, 1)
    logging.info('Under shift: %s and %s on %d sets done.', *prefix_names, len(sets))
  if swag_on:
    logging.info('Under shift: SWAG, %d samples per seed on %d sets...', config.swag.num_samples, len(sets))
    results = program.swag_evaluate_sets(state, epoch, config.swag.num_samples, arrays)
    for i, (sums, ensemble) in enumerate(results):
      rows[i] += evaluation_rows(('SWAG', 'MultiSWAG'), par.host(sums), ensemble, k, config.swag.num_samples)
  flat = [{'corruption': name, 'severity': severity, **{key: v for key, v in row.items() if key != 'bins'}}
          for (name, severity, _), set_rows in zip(sets, rows) for row in set_rows]
  benchmark = [name for name in names if name in corruptions.BENCHMARK] or list(names)
  source = f'released files in {path}' if path else f'generated, evaluation.shift_seed={ev.shift_seed}'
  return {'source': source,
          'corruptions': list(names), 'severities': list(severities), 'rows': flat,
          'summary_corruptions': benchmark, 'summary': shift_summary(flat, benchmark, severities)}


def shift_summary(rows: list, names, severities) -> list:
  """Per model (in the table's order) and severity, the mean over `names` of accuracy, NLL, ECE and
  Brier; severity 'all': the mean over every severity too (the papers' mean over corruptions x severities)."""
  models = list(dict.fromkeys(row['model'] for row in rows))
  out = []
  for model in models:
    for severity in list(severities) + ['all']:
      chosen = [row for row in rows if row['model'] == model and row['corruption'] in names
                and (severity == 'all' or row['severity'] == severity)]
      out.append({'model': model, 'severity': severity,
                  **{key: float(np.mean([row[key] for row in chosen]))
                     for key in ('accuracy', 'nll', 'ece', 'brier')}})
  return out


def format_shift_summary(shift: dict, table: list) -> str:
  """The summary as text: for accuracy, NLL and ECE, a row per model with the clean value and the
  mean over the corruptions at each severity."""
  severities = shift['severities']
  cells = {(row['model'], row['severity']): row for row in shift['summary']}
  clean = {row['model']: row for row in table}
  lines = [f"Under shift: mean over {len(shift['summary_corruptions'])} corruptions "
           f"({shift['source']})"]
  for key, label in (('accuracy', 'accuracy'), ('nll', 'NLL'), ('ece', 'ECE')):
    lines.append(f"{label:<14} {'clean':>7} " + ' '.join(f'{f"s{s}":>7}' for s in severities)
                 + f" {'mean':>7}")
    for model in dict.fromkeys(row['model'] for row in shift['summary']):
      values = [clean[model][key] if model in clean else float('nan')]
      values += [cells[model, s][key] for s in severities] + [cells[model, 'all'][key]]
      lines.append(f'{model:<14} ' + ' '.join(f'{v:7.4f}' for v in values))
  return '\n'.join(lines)


def ensemble_curve(partial: list, labels, mask, num_seeds: int) -> list:
  """Metrics of the average over more and more models, as the papers plot NLL against models averaged:
  seed 0's average over each count of samples in `partial` ([(samples, each seed's log probabilities of
  their average)]), then the first 2, .., k seeds' averages of all the samples. One row per size:
  models, accuracy, nll, ece, brier."""
  labels, mask = np.asarray(jax.device_get(labels)), np.asarray(jax.device_get(mask))

  def host(log_probs):  # (seeds, ...), with a seed axis also for one seed
    log_probs = np.asarray(jax.device_get(log_probs))
    return log_probs if num_seeds > 1 else log_probs[None]

  curve = []
  for samples, log_probs in partial:
    sums = calibration.calibration_sums(host(log_probs)[0], labels, mask)
    curve.append({'models': samples, **calibration.summarize(sums)})
  samples, log_probs = partial[-1][0], host(partial[-1][1])
  for seeds in range(2, num_seeds + 1):
    sums = calibration.calibration_sums(calibration.mean_log_probs(log_probs[:seeds]), labels, mask)
    curve.append({'models': seeds * samples, **calibration.summarize(sums)})
  return curve


def evaluation_rows(names: tuple[str, str], sums, ensemble_sums, num_seeds: int, samples: int) -> list:
  """The table's rows of one kind of model: each seed's (mean and std over the seeds) and, with several
  seeds, their ensemble's; each with the reliability diagram's bins (the seeds' examples pooled)."""
  members = steps.seed_calibration(sums, num_seeds)
  pooled = jax.tree.map(lambda x: np.sum(np.asarray(x), axis=0) if num_seeds > 1 else x, sums)
  row = {'model': names[0], 'models': samples, 'seeds': num_seeds,
         'bins': calibration.reliability(pooled)}
  for key in ('accuracy', 'nll', 'ece', 'brier'):
    values = [m[key] for m in members]
    row[key] = float(np.mean(values))
    row[f'{key}_std'] = float(np.std(values, ddof=1)) if num_seeds > 1 else 0.0
  rows = [row]
  if ensemble_sums is not None:
    ensemble = {'model': names[1], 'models': num_seeds * samples, 'seeds': num_seeds,
                'bins': calibration.reliability(ensemble_sums)}
    ensemble.update(calibration.summarize(ensemble_sums))
    rows.append(ensemble)
  return rows


def format_table(rows: list) -> str:
  """The evaluation table as text: model, models averaged, accuracy, NLL, ECE, Brier (mean +- std)."""
  lines = [f"{'model':<14} {'models':>6} {'accuracy':>17} {'NLL':>17} {'ECE':>17} {'Brier':>17}"]
  for row in rows:
    cells = []
    for key in ('accuracy', 'nll', 'ece', 'brier'):
      std = row.get(f'{key}_std', 0.0)
      cells.append(f'{row[key]:.4f} +- {std:.4f}' if row['seeds'] > 1 and f'{key}_std' in row
                   else f'{row[key]:.4f}')
    lines.append(f"{row['model']:<14} {row['models']:>6} " + ' '.join(f'{c:>17}' for c in cells))
  return '\n'.join(lines)


def export_variables(config: ml_collections.ConfigDict, workdir: str, use_swa: bool,
                     use_ema: bool = False) -> dict:
  """{'params': ..., 'batch_stats': ...} of the latest checkpoint's running, SWA or (`use_ema`) EMA model,
  as numpy."""
  if config.num_seeds > 1:
    raise ConfigError(
        f'--workdir={workdir} holds num_seeds={config.num_seeds} models; export one with '
        'train.unstack_seed(train.restore_state(config, workdir, 1), i) in Python')
  state = checkpointing.restore_state(config, workdir, steps_per_epoch=1)
  if use_ema:
    if state.ema_params is None:
      raise ConfigError(f'--workdir={workdir}: no EMA model with this config (ema.enabled=False); pass the '
                        'config the run was trained with, or --config.ema.enabled=True')
    variables = {'params': state.ema_params, 'batch_stats': state.ema_batch_stats}
  elif use_swa:
    if state.swa_count is None or int(state.swa_count) == 0:
      raise ConfigError(f'--workdir={workdir}: the checkpoint holds no SWA model')
    variables = {'params': state.swa_params, 'batch_stats': state.swa_batch_stats}
  else:
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return jax.device_get(variables)

