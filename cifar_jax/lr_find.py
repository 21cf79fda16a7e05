"""The LR range test (Leslie Smith's; fastai's `lr_find`, torch-lr-finder's `range_test`): the lr grows
exponentially over a few hundred training steps of the config's own model, optimizer (momentum, coupled
weight decay), batch size and data pipeline; the smoothed loss against the lr suggests one-cycle's
`schedule.max_lr`. The curves, stopping rule and suggestions are the anchors' (`lr_curves.py`).

`range_test` runs the k seeds (`num_seeds`) through the run's Program in one vmap-ed call per step, reads
every step's loss, and stops once every seed's curve is over (diverged, or no longer finite). It starts
from the config's initial state (its `init_from` weights in place, as a fine-tuning run starts; the
config's `finetune` groups and frozen stages as its optimizer has them) at constant `optimizer.momentum`,
and reads or writes nothing of a training run in the workdir (no checkpoint, config.json or metrics): it
writes lr_find.json and lr_find.png there.
"""

import json
import math
import os

from absl import logging
import jax
import ml_collections
import numpy as np

from cifar_jax import builders
from cifar_jax import compilation_cache
from cifar_jax import config_lib
from cifar_jax import input_pipeline
from cifar_jax import lr_curves
from cifar_jax import parallel
from cifar_jax import pretrained
from cifar_jax import program as program_lib
from cifar_jax import schedules
from cifar_jax import steps
from cifar_jax.errors import ConfigError

JSON_FILE, PLOT_FILE = 'lr_find.json', 'lr_find.png'


# The run ---------------------------------------------------------------------------------------------------


def range_test_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run config of the range test: no SWA, one step a call (the host reads every step's loss)."""
  run_config = ml_collections.ConfigDict(config.to_dict())
  run_config.swa.enabled = False
  run_config.steps_per_dispatch = 1
  return run_config


def range_test(config: ml_collections.ConfigDict, workdir: str, write: bool = True) -> dict:
  """Runs the LR range test of `config` (every seed of `num_seeds` at once) and writes its results.

  Args:
    config: a config as in configs/default.py; `config.lr_find` sets the ramp, smoothing and stop.
    workdir: where lr_find.json and lr_find.png go (created if missing); nothing else there is read or
      written.
    write: False: only return the result.

  Returns:
    The result as written to lr_find.json: the config, the lr of every step, each seed's curve and
    suggestions, each suggestion's spread over the seeds, and `max_lr` (the median over seeds of
    `lr_find.suggestion`).
  """
  config_lib.validate(config)
  compilation_cache.configure(config.compilation_cache)
  lf, k = config.lr_find, config.num_seeds
  if jax.process_count() > 1:
    raise ConfigError('--mode=lr_find runs in one process; set distributed.num_processes=0')
  run_config = range_test_config(config)
  dataset = input_pipeline.load_dataset(config.data, config.seed)  # its class count is the head's
  init = pretrained.load(config, dataset.num_classes)  # before anything is written: one-line errors
  par = parallel.create(config.parallelism, num_seeds=k, seed_devices=config.seed_devices)
  spe = config_lib.steps_per_epoch(config, par, dataset.num_train)
  lrs = lr_curves.lr_ramp(lf.start_lr, lf.end_lr, lf.num_steps, lf.smoothing)
  ratio, denominator = lf.end_lr / lf.start_lr, lr_curves.ramp_denominator(lf.num_steps, lf.smoothing)
  # start_lr * lambda(t): lr_ramp's values (the same float64 operations), as a float32 device table.
  lr_fn = schedules.lambda_lr(lf.start_lr, lambda t: ratio ** (t / denominator)).with_horizon(lf.num_steps)
  model = builders.create_model(config.model, par.num_devices, par.mode, axis_name=par.axis_name,
                                num_classes=dataset.num_classes)
  state, _ = pretrained.initialize((builders.create_seed_states(run_config, model, lr_fn), None), init, k)
  state = par.place_per_seed(state)
  zeros = steps.per_seed([steps.init_train_metrics()] * k)
  program = program_lib.Program.compile(run_config, model, par, dataset, state, par.place_per_seed(zeros),
                                        *builders.seed_data_keys(run_config), evaluate=False)
  logging.info('lr_find: %d steps of lr %g..%g (%s), %d seeds, batch %d; compiled in %.1f s', lf.num_steps,
               lf.start_lr, lf.end_lr, lf.smoothing, k, config.batch_size, program.compile_seconds)

  raw = []  # the loss of each step, per seed

  def read(acc) -> bool:
    """Appends a call's losses; True once every seed's curve is over."""
    sums = par.host(acc)
    raw.append((np.asarray(sums['loss_sum'], np.float64) / np.asarray(sums['count'], np.float64))
               .reshape(k))
    if config.log_every_steps and len(raw) % config.log_every_steps == 0:
      logging.info('lr_find: step %d, lr %.3g, loss %s', len(raw), lrs[len(raw) - 1],
                   ' '.join(f'{x:.4f}' for x in raw[-1]))
    return all(lr_curves.stopped([r[s] for r in raw], lf) for s in range(k))

  pending, perm, perm_epoch = None, None, -1
  for step in range(lf.num_steps):
    if step // spe != perm_epoch:
      perm_epoch = step // spe
      perm = program.epoch_permutation(perm_epoch)
    # Each call gets fresh sums (the call's own loss); this step runs while the host reads the last one.
    state, acc, _ = program.train_call(state, par.place_per_seed(zeros), perm, step, lambda _: True)
    if pending is not None and read(pending):
      break
    pending = acc
  else:
    read(pending)
  raw = np.stack(raw)

  curves = [lr_curves.curve(raw[:, s], lrs, lf) for s in range(k)]
  result = {
      'lr_find': lf.to_dict(), 'diverge_factor': lr_curves.diverge_factor(lf), 'num_seeds': k,
      'seeds': [config.seed + s for s in range(k)], 'steps_run': len(raw), 'lr': lrs,
      'per_seed': curves,
      'suggestions': {name: lr_curves.spread([c['suggestions'][name] for c in curves])
                      for name in lr_curves.SUGGESTIONS},
      'suggestion': lf.suggestion,
      'config': json.loads(config.to_json_best_effort()),
  }
  result['max_lr'] = result['suggestions'][lf.suggestion]['median']
  if write:
    os.makedirs(workdir, exist_ok=True)
    write_json(result, os.path.join(workdir, JSON_FILE))
    plot(result, os.path.join(workdir, PLOT_FILE))
  return result


# Outputs ---------------------------------------------------------------------------------------------------


def _jsonable(value):
  """Numpy arrays and floats as JSON values; NaN and infinities (a diverged loss) as null."""
  if isinstance(value, dict):
    return {key: _jsonable(v) for key, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.bool_):
    return bool(value)
  return value


def write_json(result: dict, path: str) -> None:
  with open(path, 'w') as f:
    json.dump(_jsonable(result), f, indent=1)
    f.write('\n')


def _lr(value: float | None) -> str:
  return '-' if value is None else f'{value:.3g}'


def report(result: dict) -> str:
  """What the command line prints: each suggestion over the seeds, then the max_lr flag for one-cycle."""
  lf = result['lr_find']
  lines = [f"LR range test: {result['num_seeds']} seed(s), lr {lf['start_lr']:g} to {lf['end_lr']:g} "
           f"over {lf['num_steps']} steps ({result['steps_run']} run), {lf['smoothing']} smoothing, stop "
           f"above {result['diverge_factor']:g}x the best loss"]
  for name, s in result['suggestions'].items():
    seeds = ' '.join(_lr(v) for v in s['per_seed'])
    lines.append(f'  {name:<9} median {_lr(s["median"]):>8}  range [{_lr(s["min"])}, {_lr(s["max"])}]'
                 f'  per seed: {seeds}')
  if result['max_lr'] is None:
    lines.append('No suggestion: too few points before the loss diverged; lower lr_find.start_lr or '
                 'raise lr_find.num_steps.')
  else:
    lines.append(f"Suggested max_lr ({result['suggestion']}, median over seeds) for configs/one_cycle.py:")
    lines.append(f"  --config.schedule.max_lr={result['max_lr']:.3g}")
  return '\n'.join(lines)


def plot(result: dict, path: str) -> None:
  """lr_find.png: the smoothed loss against the lr (log axis), each seed and the band over seeds, and
  each suggestion's median over seeds (a line; solid for the one printed as max_lr) and range (shaded)."""
  from matplotlib.figure import Figure  # only the range test plots; a training run does not import it

  fig = Figure(figsize=(8, 5), layout='constrained')
  ax = fig.subplots()
  curves = result['per_seed']
  n = min(len(c['lr']) for c in curves)
  band = np.stack([c['smoothed_loss'][:n] for c in curves])
  lrs = np.asarray(curves[0]['lr'][:n])
  if len(curves) > 1:
    ax.fill_between(lrs, np.nanmin(band, 0), np.nanmax(band, 0), color='C0', alpha=0.25,
                    label=f'min-max over {len(curves)} seeds')
  for i, c in enumerate(curves):
    ax.plot(c['lr'], c['smoothed_loss'], color='C0', lw=0.8,
            label=f"each seed ({', '.join(map(str, result['seeds']))})" if i == 0 else None)
  for i, (name, s) in enumerate(result['suggestions'].items()):
    if s['median'] is None:
      continue
    color, chosen = f'C{i + 1}', name == result['suggestion']
    ax.axvline(s['median'], color=color, ls='-' if chosen else '--', lw=2 if chosen else 1,
               label=f"{name} {s['median']:.3g}" + (' (max_lr)' if chosen else ''))
    if s['max'] > s['min']:
      ax.axvspan(s['min'], s['max'], color=color, alpha=0.12)
  finite = band[np.isfinite(band)]
  if finite.size:
    ax.set_ylim(finite.min() * 0.95, min(finite.max(), 3 * finite.min()) * 1.05)
  lf = result['lr_find']
  ax.set_xscale('log')
  ax.set_xlabel('learning rate')
  ax.set_ylabel(f"smoothed training loss ({lf['smoothing']})")
  ax.set_title(f"LR range test: max_lr {_lr(result['max_lr'])} ({result['suggestion']}, median of "
               f"{result['num_seeds']} seed(s))")
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=120)
