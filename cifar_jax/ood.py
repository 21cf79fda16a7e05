"""Out-of-distribution detection (`evaluation.ood`): the OOD sets, the scores and their metrics.

Conventions of google/uncertainty-baselines (ood_utils.py) and sklearn: the OOD examples are the positive
class and a higher score means "more likely OOD". Scores of a row's predictive probabilities p:
- msp: 1 - max_c p_c (the maximum softmax probability, Hendrycks & Gimpel 2017, turned into an OOD score);
- entropy: the predictive entropy -sum_c p_c log p_c;
- mutual_information (rows that average models: ensembles, SWAG): the predictive entropy less the mean
  of the members' entropies (the epistemic part).
Metrics, in numpy, with sklearn's handling of ties (one threshold per distinct score, every example with
that score on the same side): AUROC (`roc_auc_score`: the trapezoids of the ROC curve, so a tie counts
half), AUPRC (`average_precision_score`: sum over thresholds of the recall's step times the precision),
and FPR at 95 % TPR (the false-positive rate at the first threshold, from the highest score down, whose
true-positive rate is at least 0.95).

Sets (`parse`): 'SOURCE:PATH', the test split of any `data.source` that reads a path (`input_pipeline`'s
readers: npz, cifar10_python, ...); 'tfds:NAME', a prepared TFDS set's test split; 'noise', uniform noise
images; 'corrupted:NAME:SEVERITY', the evaluation images under a CIFAR-10-C corruption (generated and
cached as evaluation.shift's are). Each must hold images of the evaluation images' shape.
"""

import os

import ml_collections
import numpy as np

from cifar_jax import corruptions
from cifar_jax import input_pipeline
from cifar_jax.errors import DataError

SCORES = ('msp', 'entropy', 'mutual_information')
TPR = 0.95
NOISE_SEED = 0  # 'noise': np.random.default_rng(NOISE_SEED), as many images as the evaluation set
HISTOGRAM_BINS = 40
# data sources that read no path, so cannot name an OOD set
PATHLESS_SOURCES = ('tfds', 'synthetic')


# Metrics ------------------------------------------------------------------------------------------------


def _counts(in_scores, ood_scores):
  """(true positives, false positives) at each distinct score, from the highest down (sklearn's
  _binary_clf_curve): OOD is positive."""
  scores = np.concatenate([np.asarray(ood_scores, np.float64), np.asarray(in_scores, np.float64)])
  positive = np.concatenate([np.ones(np.size(ood_scores)), np.zeros(np.size(in_scores))])
  order = np.argsort(-scores, kind='mergesort')
  scores, positive = scores[order], positive[order]
  last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # the last example of each distinct score
  tps = np.cumsum(positive)[last]
  return tps, last + 1 - tps


def auroc(in_scores, ood_scores) -> float:
  tps, fps = _counts(in_scores, ood_scores)
  tpr, fpr = np.r_[0.0, tps / tps[-1]], np.r_[0.0, fps / fps[-1]]
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def auprc(in_scores, ood_scores) -> float:
  tps, fps = _counts(in_scores, ood_scores)
  precision, recall = tps / (tps + fps), tps / tps[-1]
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(in_scores, ood_scores, tpr: float = TPR) -> float:
  tps, fps = _counts(in_scores, ood_scores)
  return float(fps[np.argmax(tps / tps[-1] >= tpr)] / fps[-1])


def metrics(in_scores, ood_scores) -> dict[str, float]:
  return {'auroc': auroc(in_scores, ood_scores), 'auprc': auprc(in_scores, ood_scores),
          'fpr95': fpr_at_tpr(in_scores, ood_scores)}


# Scores -------------------------------------------------------------------------------------------------


def entropy(log_probs: np.ndarray) -> np.ndarray:
  log_probs = np.asarray(log_probs, np.float64)
  return -np.sum(np.exp(log_probs) * np.where(np.isfinite(log_probs), log_probs, 0.0), axis=-1)


def scores(log_probs: np.ndarray, member_entropy: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """{score: (n,)} of predictive log probabilities (n, classes); `member_entropy` (n,), the mean entropy of
  the models averaged, adds the mutual information."""
  top = np.max(np.asarray(log_probs, np.float64), axis=-1)
  out = {'msp': 1.0 - np.exp(top), 'entropy': entropy(log_probs)}
  if member_entropy is not None:
    out['mutual_information'] = out['entropy'] - np.asarray(member_entropy, np.float64)
  return out


def histogram(in_scores, ood_scores, score: str, num_classes: int) -> dict:
  """Counts of the in-distribution and OOD scores over HISTOGRAM_BINS equal bins of the score's range."""
  top = 1.0 if score == 'msp' else float(np.log(num_classes))
  edges = np.linspace(0.0, top, HISTOGRAM_BINS + 1)
  clip = lambda s: np.clip(np.asarray(s, np.float64), 0.0, top)
  return {'edges': edges.tolist(), 'in': np.histogram(clip(in_scores), edges)[0].tolist(),
          'ood': np.histogram(clip(ood_scores), edges)[0].tolist()}


# Sets ---------------------------------------------------------------------------------------------------


def parse(value: str) -> list[str]:
  """The set names of `evaluation.ood` (separated by commas); ValueError for one that names no set."""
  names = [name.strip() for name in value.split(',') if name.strip()] if value else []
  readers = [s for s in input_pipeline.SOURCES if s not in PATHLESS_SOURCES]
  for name in names:
    kind, _, rest = name.partition(':')
    if name == 'noise':
      continue
    if kind == 'corrupted':
      corruption, _, severity = rest.partition(':')
      if corruption not in corruptions.CORRUPTIONS or severity not in tuple(map(str, corruptions.SEVERITIES)):
        raise ValueError(f"{name!r}: 'corrupted:NAME:SEVERITY' needs a corruption among "
                         f'{", ".join(corruptions.CORRUPTIONS)} and a severity 1..5')
    elif kind == 'tfds':
      if not rest:
        raise ValueError(f"{name!r}: 'tfds:NAME' needs a TFDS name (svhn_cropped, cifar100, ...)")
    elif kind in readers:
      if not rest:
        raise ValueError(f"{name!r}: '{kind}:PATH' needs a path")
    else:
      raise ValueError(f"{name!r} is no OOD set: give 'SOURCE:PATH' (SOURCE one of {', '.join(readers)}), "
                       "'tfds:NAME', 'noise' or 'corrupted:NAME:SEVERITY'")
  if len(set(names)) != len(names):
    raise ValueError(f'{value!r} names a set twice')
  return names


def _tfds_test_images(name: str, data_dir: str) -> np.ndarray:
  """The test split's images of a TFDS set prepared (as array_record) in data_dir."""
  if name == 'cifar10':
    return input_pipeline.load_dataset(ml_collections.ConfigDict(dict(
        source='tfds', data_dir=data_dir, path='', validation_size=0))).eval_images
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError('needs tensorflow_datasets (pip install tensorflow-datasets)') from e
  root = os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))
  try:
    source = tfds.data_source(name, split='test', data_dir=root, download=False)
    return np.stack([np.asarray(source[i]['image']) for i in range(len(source))])
  except Exception as e:  # not prepared, no test split, not array_record
    raise DataError(f'no prepared test split of {name!r} in {root} ({type(e).__name__}: {e}); prepare '
                    'it with tfds (tfds build), or give its test images as an npz') from e


def load(name: str, config: ml_collections.ConfigDict, eval_images: np.ndarray) -> np.ndarray:
  """The uint8 images of the OOD set `name` (`parse`); DataError (one line) for a missing or unreadable
  set, or images of another shape than the evaluation images'."""
  kind, _, rest = name.partition(':')
  try:
    if name == 'noise':
      images = np.random.default_rng(NOISE_SEED).integers(0, 256, eval_images.shape, dtype=np.uint8)
    elif kind == 'corrupted':
      corruption, _, severity = rest.partition(':')
      ev = config.evaluation
      images = corruptions.corrupted_set(eval_images, corruption, int(severity), ev.shift_seed,
                                         corruptions.cache_dir(ev.shift_cache),
                                         corruptions.images_hash(eval_images))
    elif kind == 'tfds':
      images = _tfds_test_images(rest, config.data.get('data_dir', ''))
    else:
      data = ml_collections.ConfigDict(config.data.to_dict())
      data.update(source=kind, path=rest, validation_size=0)
      images = input_pipeline.load_dataset(data, config.seed).eval_images
  except DataError as e:
    message = str(e).removeprefix('data.path: ')
    raise DataError(f'evaluation.ood set {name!r}: {message}') from e
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != eval_images.shape[1:]:
    raise DataError(f'evaluation.ood set {name!r}: images of {images.dtype} {images.shape[1:]}, but the '
                    f'evaluation images are uint8 {eval_images.shape[1:]}: give the set at that size')
  return images


def describe(name: str) -> str:
  """What the set is, for the table and evaluation.json."""
  kind, _, rest = name.partition(':')
  if name == 'noise':
    return f'uniform noise images (seed {NOISE_SEED})'
  if kind == 'corrupted':
    corruption, _, severity = rest.partition(':')
    return f'the evaluation images under {corruption} at severity {severity} (generated)'
  if kind == 'tfds':
    return f'TFDS {rest}, test split'
  return f'data.source={kind} {rest}, test split'
