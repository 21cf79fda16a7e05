"""OOD detection (evaluation.ood, cifar_jax/ood.py, cifar_jax/uncertainty.py): the metrics against their
definitions and sklearn's (ties included), the scores, the sets and their one-line errors, and
--mode=evaluate with TTA, temperature scaling and OOD detection on."""

import itertools
import json
import os

import numpy as np
import pytest

from cifar_jax import config_lib
from cifar_jax import ood
from cifar_jax import train
from cifar_jax import uncertainty
from cifar_jax.errors import ConfigError
from cifar_jax.errors import DataError
from tests import conftest
from tests.test_shift import cli  # noqa: F401 (the fixture: --mode=evaluate's exit status and stderr)


def _tied_scores(seed, n_in=300, n_ood=200):
  """Scores on a coarse grid (many ties within and across the two sets), OOD a little higher."""
  rng = np.random.default_rng(seed)
  return np.round(rng.normal(0.0, 1.0, n_in), 1), np.round(rng.normal(0.7, 1.0, n_ood), 1)


def _direct(in_scores, ood_scores):
  """The definitions, threshold by threshold: 'OOD' when score >= t, for every distinct score t."""
  pairs = np.asarray(list(itertools.product(ood_scores, in_scores)))
  auroc = np.mean(pairs[:, 0] > pairs[:, 1]) + 0.5 * np.mean(pairs[:, 0] == pairs[:, 1])
  ap, last_recall, fpr95 = 0.0, 0.0, 1.0
  for t in np.unique(np.concatenate([in_scores, ood_scores]))[::-1]:
    tp, fp = np.sum(ood_scores >= t), np.sum(in_scores >= t)
    recall = tp / ood_scores.size
    ap += (recall - last_recall) * tp / (tp + fp)
    last_recall = recall
    if recall >= ood.TPR:
      fpr95 = min(fpr95, fp / in_scores.size)
  return {'auroc': auroc, 'auprc': ap, 'fpr95': fpr95}


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_metrics_equal_their_definitions_with_ties(seed):
  in_scores, ood_scores = _tied_scores(seed)
  got, want = ood.metrics(in_scores, ood_scores), _direct(in_scores, ood_scores)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-12, err_msg=key)
  assert 0.6 < got['auroc'] < 0.8  # the shift shows; neither 0.5 nor 1


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_metrics_equal_sklearns(seed):
  metrics = pytest.importorskip('sklearn.metrics')  # the dev extra installs scikit-learn
  in_scores, ood_scores = _tied_scores(seed)
  labels = np.r_[np.zeros(in_scores.size), np.ones(ood_scores.size)]
  scores = np.r_[in_scores, ood_scores]
  got = ood.metrics(in_scores, ood_scores)
  np.testing.assert_allclose(got['auroc'], metrics.roc_auc_score(labels, scores), rtol=1e-12)
  np.testing.assert_allclose(got['auprc'], metrics.average_precision_score(labels, scores), rtol=1e-12)
  fpr, tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
  np.testing.assert_allclose(got['fpr95'], fpr[np.argmax(tpr >= ood.TPR)], rtol=1e-12)


def test_a_set_against_itself_gives_auroc_one_half():
  in_scores, _ = _tied_scores(3)
  assert ood.auroc(in_scores, in_scores) == 0.5
  assert ood.auroc(in_scores, in_scores[::-1].copy()) == 0.5
  assert ood.auroc(np.zeros(5), np.ones(7)) == 1.0 and ood.fpr_at_tpr(np.zeros(5), np.ones(7)) == 0.0


def test_scores():
  with np.errstate(divide='ignore'):
    log_probs = np.log(np.asarray([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]]))
  s = ood.scores(log_probs)
  np.testing.assert_allclose(s['msp'], [0.5, 0.1, 0.0])
  np.testing.assert_allclose(s['entropy'], [np.log(2), -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)), 0.0])
  assert 'mutual_information' not in s
  # Two members that disagree: MI = H(mean) - mean H; two that agree: 0.
  members = uncertainty.Members(np.log(np.asarray([[[0.9, 0.1]], [[0.1, 0.9]]], np.float32)))
  mean = members.mean()
  mi = ood.scores(mean.log_probs[0], mean.entropy[0])['mutual_information']
  np.testing.assert_allclose(mi, [np.log(2) - ood.entropy(np.log([0.9, 0.1]))], rtol=1e-6)
  same = uncertainty.Members(np.log(np.asarray([[[0.9, 0.1]], [[0.9, 0.1]]], np.float32))).mean()
  np.testing.assert_allclose(ood.scores(same.log_probs[0], same.entropy[0])['mutual_information'], [0.0],
                             atol=1e-6)
  h = ood.histogram([0.1, 0.2], [0.9], 'msp', 10)
  assert sum(h['in']) == 2 and sum(h['ood']) == 1 and len(h['edges']) == ood.HISTOGRAM_BINS + 1


def test_sets_are_parsed_and_loaded(tmp_path):
  assert ood.parse('') == []
  assert ood.parse('noise, corrupted:fog:5,npz:/x.npz,tfds:svhn_cropped') == [
      'noise', 'corrupted:fog:5', 'npz:/x.npz', 'tfds:svhn_cropped']
  for bad, message in (('svhn', 'is no OOD set'), ('corrupted:fog:9', 'a severity 1..5'),
                       ('npz:', 'needs a path'), ('noise,noise', 'names a set twice')):
    with pytest.raises(ValueError, match=message):
      ood.parse(bad)
  config = conftest.make_tiny_config()
  config.evaluation.ood = 'svhn'
  with pytest.raises(ConfigError, match="evaluation.ood: 'svhn' is no OOD set"):
    config_lib.validate(config)
  eval_images = np.zeros((20, 32, 32, 3), np.uint8)
  noise = ood.load('noise', config, eval_images)
  assert noise.shape == eval_images.shape and noise.std() > 50
  np.testing.assert_array_equal(noise, ood.load('noise', config, eval_images))
  x = np.random.default_rng(0).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
  path = tmp_path / 'other.npz'
  np.savez(path, x_train=x, y_train=np.zeros(30, np.int64), x_test=x[:7], y_test=np.zeros(7, np.int64))
  np.testing.assert_array_equal(ood.load(f'npz:{path}', config, eval_images), x[:7])  # the test split
  with pytest.raises(DataError, match=r"evaluation.ood set 'npz:/no/such.npz': no such file"):
    ood.load('npz:/no/such.npz', config, eval_images)


def _write_small_images(path):
  x = np.zeros((10, 28, 28, 3), np.uint8)
  np.savez(path, x_train=x, y_train=np.zeros(10, np.int64), x_test=x, y_test=np.zeros(10, np.int64))


@pytest.mark.parametrize('case,message', [('missing', 'no such file'), ('size', '(N, 32, 32, 3)'),
                                          ('tfds', 'evaluation.ood set')])
def test_a_bad_ood_set_is_one_line_and_status_2(cli, tmp_path, case, message):  # noqa: F811
  path = tmp_path / 'set.npz'
  if case == 'size':
    _write_small_images(path)
  spec = {'tfds': 'tfds:no_such_dataset_here'}.get(case, f'npz:{path}')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  code, stderr = cli(f'--config.evaluation.ood={spec}', workdir=str(workdir))
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1 and 'Traceback' not in stderr, stderr
  assert message in lines[0] and 'evaluation.ood set' in lines[0]


def test_evaluate_with_tta_temperature_and_ood(tiny_config, tmp_path):
  """The default suite's end-to-end check: one seed, one epoch, flip TTA, T and uniform noise as the OOD
  set (the slow test below covers every row)."""
  config = tiny_config
  config.num_epochs = 1
  config.data.validation_size = 40
  config.evaluation.update(tta='flip', temperature=True, ood='noise')
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  out = train.evaluate_checkpoint(config, workdir)
  assert [r['model'] for r in out['table']] == ['single model']
  (row,) = out['temperature']['rows']
  assert row['accuracy'] == pytest.approx(out['table'][0]['accuracy'])
  assert row['nll'] <= out['table'][0]['nll'] + 1e-6 and row['temperature'] > 0
  assert [(r['model'], r['set'], r['score']) for r in out['ood']['rows']] == [
      ('single model', 'noise', 'msp'), ('single model', 'noise', 'entropy')]
  hist = out['ood']['histograms']['single model']['noise']['entropy']
  assert sum(hist['in']) == 40 and sum(hist['ood']) == 40
  json.dumps(out)
  assert 'After temperature scaling' in uncertainty.format_temperature(out['temperature'], out['table'])
  assert 'noise' in uncertainty.format_ood(out['ood'])


MODELS = ['single model', 'deep ensemble', 'SWA', 'MultiSWA', 'SWAG', 'MultiSWAG']


@pytest.mark.slow
def test_every_row_of_a_multiswag_run(tiny_config, tmp_path, monkeypatch):
  """k = 2 SWAG with flip_translate TTA: every row gets a temperature and OOD rows (mutual information
  for the rows that average models); with T forced to 1 the rows after scaling are the table's (the host
  path sees the compiled eval's views, seeds and SWAG samples); TTA changes every row."""
  config = tiny_config
  config.num_epochs = 2
  config.num_seeds = 2
  config.data.validation_size = 40
  config.schedule.name = 'one_cycle'
  config.swa.update(enabled=True, start_epoch=1, lr=0.01)
  config.swag.update(enabled=True, rank=2, num_samples=2, samples_per_call=2)
  config.evaluation.update(tta='flip_translate', temperature=True, ood='noise,corrupted:gaussian_noise:5',
                           shift_cache=str(tmp_path / 'cache'))
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  out = train.evaluate_checkpoint(config, workdir)
  assert [r['model'] for r in out['table']] == MODELS
  assert [r['model'] for r in out['temperature']['rows']] == MODELS
  scores = {(r['model'], r['set']): [] for r in out['ood']['rows']}
  for r in out['ood']['rows']:
    scores[r['model'], r['set']].append(r['score'])
    assert 0 <= r['auroc'] <= 1 and 0 <= r['auprc'] <= 1 and 0 <= r['fpr95'] <= 1
  for model in MODELS:
    for name in ('noise', 'corrupted:gaussian_noise:5'):
      want = ['msp', 'entropy'] + (['mutual_information'] if model not in ('single model', 'SWA') else [])
      assert scores[model, name] == want
  assert os.listdir(tmp_path / 'cache')
  monkeypatch.setattr(uncertainty.temperature, 'fit', lambda *a: 1.0)
  again = train.evaluate_checkpoint(config, workdir)
  for before, after in zip(again['table'], again['temperature']['rows']):
    for key in ('accuracy', 'nll', 'ece', 'brier'):
      np.testing.assert_allclose(after[key], before[key], rtol=2e-5, atol=1e-6,
                                 err_msg=f"{before['model']} {key}")
  config.evaluation.update(tta='none', temperature=False, ood='')
  plain = train.evaluate_checkpoint(config, workdir)
  for a, b in zip(plain['table'], out['table']):
    assert a['nll'] != b['nll'], a['model']


def test_plot_ood_draws_the_histograms(tmp_path, capsys):
  """scripts/plot.py's OOD figure (`ood`, and beside calibration.png) from the rows' histograms."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(conftest.ROOT, 'scripts'))
  import plot  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  draw = lambda n: uncertainty.Members(np.log(rng.dirichlet(np.ones(10), (2, n))).astype(np.float32))
  rows, histograms = uncertainty.ood_rows({'single model': [draw(30), draw(20)]}, ['noise'], 2)
  assert {r['model'] for r in rows} == {'single model', 'deep ensemble'}
  table = [{'model': 'single model', 'models': 1, 'seeds': 2, 'accuracy': 0.5, 'nll': 1.0, 'ece': 0.1,
            'brier': 0.6, 'bins': {'count': [1], 'confidence': [0.5], 'accuracy': [0.5]}}]
  (tmp_path / 'evaluation.json').write_text(json.dumps({'table': table, 'ood': {
      'in_distribution': 'validation (30 images)', 'rows': rows, 'histograms': histograms}}))
  plot.main(['ood', str(tmp_path)])
  assert (tmp_path / 'ood.png').stat().st_size > 0
  (tmp_path / 'ood.png').unlink()
  plot.main(['calibration', str(tmp_path)])
  assert (tmp_path / 'ood.png').stat().st_size > 0 and (tmp_path / 'calibration.png').stat().st_size > 0
  (tmp_path / 'evaluation.json').write_text(json.dumps({'table': table}))
  with pytest.raises(SystemExit, match='no OOD detection'):
    plot.main(['ood', str(tmp_path)])
