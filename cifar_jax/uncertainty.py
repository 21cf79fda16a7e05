"""--mode=evaluate's temperature scaling (`evaluation.temperature`) and OOD detection (`evaluation.ood`) of
every row of the evaluation table.

Each kind of model (running, SWA, EMA, SWAG) is evaluated by the table's compiled functions on the evaluation
set and on every OOD set (cut into calls of the evaluation set's shapes, so nothing new compiles; SWAG's
samples drawn and recalibrated once for all the sets), and each seed's log probabilities come to the
host: a seed's row uses them one seed at a time (mean and std over the seeds), an ensemble row averages
their probabilities (`calibration.mean_log_probs`). With `evaluation.tta` they are the views' average.
`temperature.py` fits and applies T, `ood.py` scores and measures.
"""

import dataclasses

from absl import logging
import jax
import ml_collections
import numpy as np

from cifar_jax import calibration
from cifar_jax import ema as ema_lib
from cifar_jax import input_pipeline
from cifar_jax import ood
from cifar_jax import program as program_lib
from cifar_jax import temperature
from cifar_jax.errors import ConfigError

KINDS = (('single model', 'deep ensemble'), ('SWA', 'MultiSWA'), ema_lib.NAMES, ('SWAG', 'MultiSWAG'))
METHOD = (f'golden-section search on log T in [{temperature.T_MIN}, {temperature.T_MAX}], '
          f'{temperature.GOLDEN_STEPS} steps, float64')


@dataclasses.dataclass
class Members:
  """One kind of model's predictions on one set: each seed's log probabilities (seeds, n, classes) and,
  for SWAG, each seed's mean entropy over its samples (seeds, n)."""

  log_probs: np.ndarray
  entropy: np.ndarray | None = None

  def mean(self) -> 'Members':
    """The seeds' average as one member: log mean probabilities, and the mean entropy of the models
    averaged (each seed's own, or its samples' mean)."""
    lp = self.log_probs.astype(np.float64)
    top = np.max(lp, axis=0)
    mean = top + np.log(np.mean(np.exp(lp - top), axis=0))
    member_entropy = ood.entropy(lp) if self.entropy is None else self.entropy
    return Members(mean[None].astype(np.float32), np.mean(member_entropy, axis=0)[None])


def wanted(config: ml_collections.ConfigDict) -> tuple[bool, list[str]]:
  """(temperature scaling on, the OOD sets' names)."""
  ev = config.get('evaluation', {})
  return bool(ev.get('temperature', False)), ood.parse(ev.get('ood', ''))


def load_ood_sets(config: ml_collections.ConfigDict, dataset: input_pipeline.Dataset) -> list:
  """[(name, uint8 images)] of evaluation.ood, read before anything compiles (DataError: one line)."""
  return [(name, ood.load(name, config, dataset.eval_images)) for name in wanted(config)[1]]


def _chunks(images: np.ndarray, shapes, par) -> list:
  """`images` as eval arrays of the evaluation set's (batches, batch) shapes, the last padded and masked,
  labels 0 (the sums they give are not read)."""
  num_batches, batch = shapes
  per_call = num_batches * batch
  out = []
  for start in range(0, images.shape[0], per_call):
    part = images[start:start + per_call]
    n, pad = part.shape[0], per_call - part.shape[0]
    part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    out.append(par.shard_eval_arrays((part.reshape((num_batches, batch) + part.shape[1:]),
                                      np.zeros((num_batches, batch), np.int32),
                                      mask.reshape(num_batches, batch))))
  return out


def _host(log_probs, num_seeds: int) -> np.ndarray:
  """(seeds, batches * batch, classes) numpy of a compiled eval's log probabilities."""
  x = np.asarray(jax.device_get(log_probs))
  return x.reshape((num_seeds, -1, x.shape[-1]))


def predictions(program: program_lib.Program, state, sets: list, *, num_seeds: int, swa_on: bool,
                swag_on: bool, epoch: int, num_samples: int, with_entropy: bool) -> dict[str, list[Members]]:
  """{kind ('single model', 'SWA', 'EMA', 'SWAG'): [Members of each set]}; `sets`: [(eval arrays of each call,
  number of examples)]."""
  flat = [arrays for chunks, _ in sets for arrays in chunks]

  def per_set(chunk_members: list) -> list[Members]:
    out, i = [], 0
    for chunks, n in sets:
      parts = chunk_members[i:i + len(chunks)]
      i += len(chunks)
      log_probs = np.concatenate([p[0] for p in parts], axis=1)[:, :n]
      entropy = None if parts[0][1] is None else np.concatenate([p[1] for p in parts], axis=1)[:, :n]
      out.append(Members(log_probs, entropy))
    return out

  out = {}
  for kind, use_swa in (('single model', False), ('SWA', True))[:1 + swa_on]:
    out[kind] = per_set([(_host(program.evaluate_members(state, use_swa=use_swa, eval_arrays=arrays)[2],
                                num_seeds), None) for arrays in flat])
  if state.ema_params is not None:  # config.ema: the weights' moving average
    out[ema_lib.NAMES[0]] = per_set([(_host(program.evaluate_members(
        state, eval_arrays=arrays, use_ema=True)[2], num_seeds), None) for arrays in flat])
  if swag_on:
    logging.info('SWAG for temperature scaling and OOD detection: %d samples per seed on %d calls...',
                 num_samples, len(flat))
    results = program.swag_log_probs_sets(state, epoch, num_samples, flat, every_call=False,
                                          with_entropy=with_entropy)
    out['SWAG'] = per_set([(_host(r[-1][1], num_seeds),
                            _host(r[-1][2][..., None], num_seeds)[..., 0] if with_entropy else None)
                           for r in results])
  return out


def _rows(members: Members, num_seeds: int, names: tuple[str, str]):
  """[(row name, Members whose seeds are that row's models one by one)]: the kind's own row, and with
  several seeds their average."""
  rows = [(names[0], members)]
  if num_seeds > 1:
    rows.append((names[1], members.mean()))
  return rows


def _mean_std(name: str, values: list[float]) -> dict:
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {name: float(np.mean(values)), f'{name}_std': std}


def temperature_rows(preds: dict[str, list[Members]], labels: np.ndarray, num_seeds: int) -> list[dict]:
  """Per row: T fitted on the held-out split (set 0), and accuracy, NLL, ECE, Brier after it (mean and
  std over the seeds of a seed's row, which shares one T)."""
  out = []
  mask = np.ones(labels.shape, np.float32)
  for names in KINDS:
    if names[0] not in preds:
      continue
    for row, members in _rows(preds[names[0]][0], num_seeds, names):
      t = temperature.fit(members.log_probs, labels)
      summaries = [calibration.summarize(calibration.calibration_sums(
          temperature.scale(lp, t).astype(np.float32), labels, mask)) for lp in members.log_probs]
      entry = {'model': row, 'temperature': t}
      for key in ('accuracy', 'nll', 'ece', 'brier'):
        entry.update(_mean_std(key, [s[key] for s in summaries]))
      out.append(entry)
  return out


def ood_rows(preds: dict[str, list[Members]], names: list[str], num_seeds: int) -> tuple[list, dict]:
  """(rows: per table row, OOD set and score, AUROC, AUPRC, FPR@95 (mean, std over a seed's row's
  seeds); histograms: {row: {set: {score: ood.histogram}}}, a seed's row's seeds pooled)."""
  rows, histograms = [], {}
  for kinds in KINDS:
    if kinds[0] not in preds:
      continue
    per_set = preds[kinds[0]]
    for (row, in_members), *outs in zip(*[_rows(m, num_seeds, kinds) for m in per_set]):
      averaged = row != kinds[0] or row == 'SWAG'  # a row whose models average others: MI too

      def seed_scores(members, s, averaged=averaged):
        return ood.scores(members.log_probs[s], members.entropy[s] if averaged else None)

      num_classes = in_members.log_probs.shape[-1]
      seeds = range(in_members.log_probs.shape[0])
      in_scores = [seed_scores(in_members, s) for s in seeds]
      histograms[row] = {}
      for name, (_, out_members) in zip(names, outs):
        out_scores = [seed_scores(out_members, s) for s in seeds]
        histograms[row][name] = {}
        for score in in_scores[0]:
          per_seed = [ood.metrics(a[score], b[score]) for a, b in zip(in_scores, out_scores)]
          entry = {'model': row, 'set': name, 'score': score}
          for key in ('auroc', 'auprc', 'fpr95'):
            entry.update(_mean_std(key, [m[key] for m in per_seed]))
          rows.append(entry)
          histograms[row][name][score] = ood.histogram(np.concatenate([a[score] for a in in_scores]),
                                                       np.concatenate([b[score] for b in out_scores]),
                                                       score, num_classes)
  return rows, histograms


def evaluate(config: ml_collections.ConfigDict, program: program_lib.Program, state,
             dataset: input_pipeline.Dataset, ood_sets: list, epoch: int, swa_on: bool,
             swag_on: bool) -> dict:
  """{'temperature': {...}} and / or {'ood': {...}} of every row, as `wanted(config)` asks."""
  if jax.process_count() > 1:
    raise ConfigError('evaluation.temperature and evaluation.ood run in one process; set '
                      'distributed.num_processes=0')
  fit_temperature, _ = wanted(config)
  par, k = program.par, config.num_seeds
  eval_arrays = program.data['eval_arrays']
  num_batches, batch = eval_arrays[1].shape[:2]
  sets = [([eval_arrays], dataset.num_eval)]
  sets += [(_chunks(images, (num_batches, batch), par), images.shape[0]) for _, images in ood_sets]
  preds = predictions(program, state, sets, num_seeds=k, swa_on=swa_on, swag_on=swag_on, epoch=epoch,
                      num_samples=config.swag.num_samples, with_entropy=bool(ood_sets))
  out = {}
  if fit_temperature:
    out['temperature'] = {'fitted_on': f'{dataset.eval_split} ({dataset.num_eval} images)', 'method': METHOD,
                          'rows': temperature_rows(preds, dataset.eval_labels, k)}
  if ood_sets:
    names = [name for name, _ in ood_sets]
    rows, histograms = ood_rows(preds, names, k)
    out['ood'] = {'in_distribution': f'{dataset.eval_split} ({dataset.num_eval} images)',
                  'sets': [{'name': name, 'what': ood.describe(name), 'count': int(images.shape[0])}
                           for name, images in ood_sets],
                  'rows': rows, 'histograms': histograms}
  return out


def format_temperature(result: dict, table: list) -> str:
  """The rows after temperature scaling beside the table's before: T, accuracy, NLL, ECE, Brier."""
  before = {row['model']: row for row in table}
  lines = [f"After temperature scaling (T fitted on {result['fitted_on']}; before -> after)",
           f"{'model':<14} {'T':>7} {'accuracy':>9} {'NLL':>17} {'ECE':>17} {'Brier':>17}"]
  for row in result['rows']:
    b = before.get(row['model'], {})
    cells = [f"{b.get(key, float('nan')):.4f} -> {row[key]:.4f}" for key in ('nll', 'ece', 'brier')]
    lines.append(f"{row['model']:<14} {row['temperature']:7.4f} {row['accuracy']:9.4f} "
                 + ' '.join(f'{c:>17}' for c in cells))
  return '\n'.join(lines)


def format_ood(result: dict) -> str:
  """The OOD table: per row, set and score, AUROC, AUPRC, FPR@95 (mean +- std over a seed's row's seeds)."""
  lines = [f"OOD detection (in-distribution: {result['in_distribution']}; "
           + '; '.join(f"{s['name']}: {s['what']}, {s['count']} images" for s in result['sets']) + ')',
           f"{'model':<14} {'set':<24} {'score':<18} {'AUROC':>17} {'AUPRC':>17} {'FPR@95':>17}"]
  for row in result['rows']:
    cells = [f"{row[key]:.4f} +- {row[f'{key}_std']:.4f}" if row[f'{key}_std'] else f'{row[key]:.4f}'
             for key in ('auroc', 'auprc', 'fpr95')]
    lines.append(f"{row['model']:<14} {row['set'][:24]:<24} {row['score']:<18} "
                 + ' '.join(f'{c:>17}' for c in cells))
  return '\n'.join(lines)
