"""CIFAR-100: the readers on files in the real formats (no network), the class count from the data in every
model's head, the torch twin and the metrics, CIFAR-100-C, and a 100-class run end to end."""

import functools
import importlib
import json
import os
import pickle
import sys
import time

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cifar_jax import builders
from cifar_jax import config_lib
from cifar_jax import corruptions
from cifar_jax import input_pipeline as ip
from cifar_jax import main
from cifar_jax import metrics_writer
from cifar_jax import models
from cifar_jax import pretrained
from cifar_jax import steps
from cifar_jax import torch_reference
from cifar_jax import train
from cifar_jax.errors import ConfigError
from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny.py')


def _data_config(**kwargs):
  config = ml_collections.ConfigDict(dict(
      source='cifar100_python', data_dir='', path='', validation_size=0, drop_remainder=False, augment=True,
      tfds_name='cifar100', synthetic_train_size=64, synthetic_eval_size=16))
  config.update(kwargs)
  return config


def _images(n, seed=0, num_classes=100):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, num_classes, n),
          rng.integers(0, 20, n))


def write_cifar100_python(folder, sizes=(('train', 12), ('test', 6)), meta=True, fine=None):
  """A `cifar-100-python` folder as the CIFAR site's archive holds it: protocol-2 pickles of dicts with
  b'filenames', b'batch_label', b'fine_labels', b'coarse_labels' and b'data' (rows of 3072 CHW bytes),
  numpy 1's names, and `meta`. Returns {name: (images, fine labels, coarse labels)}."""
  os.makedirs(folder, exist_ok=True)
  written = {}
  for i, (name, n) in enumerate(sizes):
    x, y, coarse = _images(n, seed=i)
    if fine is not None and name == 'train':
      y[0] = fine
    written[name] = (x, y, coarse)
    batch = {b'filenames': [f'img_{k}.png'.encode() for k in range(n)], b'batch_label': name.encode(),
             b'fine_labels': list(map(int, y)), b'coarse_labels': list(map(int, coarse)),
             b'data': x.transpose(0, 3, 1, 2).reshape(n, -1)}
    blob = pickle.dumps(batch, protocol=2).replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(blob)
  if meta:
    names = {b'fine_label_names': [f'class_{k}'.encode() for k in range(100)],
             b'coarse_label_names': [f'super_{k}'.encode() for k in range(20)]}
    with open(os.path.join(folder, 'meta'), 'wb') as f:
      pickle.dump(names, f, protocol=2)
  return written


# The readers --------------------------------------------------------------------------------------------


def test_cifar100_python_pickles_fine_labels_and_class_count(tmp_path):
  folder = str(tmp_path / 'cifar-100-python')
  written = write_cifar100_python(folder)
  data = ip.load_dataset(_data_config(path=folder))
  assert data.num_classes == 100 and data.eval_split == 'test'
  np.testing.assert_array_equal(data.train_images, written['train'][0])
  np.testing.assert_array_equal(data.train_labels, written['train'][1])  # the fine labels, not coarse
  np.testing.assert_array_equal(data.eval_images, written['test'][0])
  np.testing.assert_array_equal(data.eval_labels, written['test'][1])
  held_out = ip.load_dataset(_data_config(path=folder, validation_size=4))
  assert held_out.num_classes == 100 and held_out.eval_split == 'validation' and held_out.num_train == 8
  os.remove(os.path.join(folder, 'meta'))  # without meta: the 100 fine labels
  assert ip.load_dataset(_data_config(path=folder)).num_classes == 100
  write_cifar100_python(folder, fine=100)
  with pytest.raises(ip.DataError, match=r'labels must lie in 0\.\.99 \(100 classes\), got \d+\.\.100'):
    ip.load_dataset(_data_config(path=folder))
  os.remove(os.path.join(folder, 'test'))
  with pytest.raises(ip.DataError, match=r"lacks \['test'\]"):
    ip.load_dataset(_data_config(path=folder))


def test_cifar100_binary_archive_parser(tmp_path):
  """The format of the official archive the tfds source downloads: coarse and fine label bytes, then 3072."""
  expected = {}
  for i, name in enumerate(('train.bin', 'test.bin')):
    x, y, coarse = _images(5, seed=i)
    expected[name] = (x, y)
    records = np.concatenate([coarse[:, None].astype(np.uint8), y[:, None].astype(np.uint8),
                              x.transpose(0, 3, 1, 2).reshape(5, -1)], 1)
    records.tofile(tmp_path / name)
  arrays = ip._read_cifar10_binary(str(tmp_path), 'cifar100')
  assert arrays['num_classes'] == 100
  np.testing.assert_array_equal(arrays['x_train'], expected['train.bin'][0])
  np.testing.assert_array_equal(arrays['y_train'], expected['train.bin'][1])
  np.testing.assert_array_equal(arrays['y_test'], expected['test.bin'][1])
  assert ip._find_binary_folder(str(tmp_path), 'cifar100') == str(tmp_path)


def test_tfds_cifar100_from_tfds_style_examples_and_the_cache(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):  # tfds-style examples: image, label (fine), coarse_label
    data = ip.load_dataset(_data_config(source='tfds', data_dir=str(tmp_path)))
  assert data.num_classes == 100 and data.train_images.shape == (12, 32, 32, 3)
  assert data.train_labels.max() <= 99
  # The prepared cache (the npz the archive's path writes, its class count stated in it) is read first.
  x, y, _ = _images(12)
  os.makedirs(tmp_path / 'cifar100_jax')
  np.savez(tmp_path / 'cifar100_jax' / 'cifar100.npz', x_train=x, y_train=y, x_test=x[:4], y_test=y[:4],
           num_classes=100)
  data = ip.load_dataset(_data_config(source='tfds', data_dir=str(tmp_path)))
  assert data.num_classes == 100 and data.num_train == 12
  # Not prepared and offline: one line within seconds (an address that never resolves; no real host).
  monkeypatch.setitem(ip.TFDS_DATASETS['cifar100'], 'url', 'https://cifar.invalid/cifar-100-binary.tar.gz')
  start = time.time()
  with pytest.raises(ip.DataError, match='cifar100 is not prepared') as e:
    ip.load_dataset(_data_config(source='tfds', data_dir=str(tmp_path / 'empty')))
  assert time.time() - start < 15 and '\n' not in str(e.value)


def test_npz_states_its_class_count(tmp_path):
  x, y, _ = _images(10)
  path = str(tmp_path / 'c100.npz')
  np.savez(path, x_train=x, y_train=y, x_test=x[:3], y_test=y[:3], num_classes=np.int64(100))
  data = ip.load_dataset(_data_config(source='npz', path=path))
  assert data.num_classes == 100
  np.testing.assert_array_equal(data.train_labels, y)
  np.savez(path, x_train=x, y_train=np.full(10, 99))  # unstated: CIFAR-10's 10, and a hint
  with pytest.raises(ip.DataError, match=r'0\.\.9 \(10 classes\), got 99\.\.99 .*num_classes=100'):
    ip.load_npz(path)
  np.savez(path, x_train=x, y_train=np.full(10, 20), num_classes=20)
  with pytest.raises(ip.DataError, match=r'0\.\.19 \(20 classes\), got 20\.\.20'):
    ip.load_npz(path)
  np.savez(path, x_train=x, y_train=y, num_classes=np.array([100, 100]))
  with pytest.raises(ip.DataError, match='num_classes must be one integer'):
    ip.load_npz(path)


# Heads, the twin, the metrics -------------------------------------------------------------------------


# resnet18 and torchvision_resnet34 / 50 are the classes of resnet9 and torchvision_resnet18 at other depths.
SAME_CLASS_AS_ANOTHER = ('resnet18', 'torchvision_resnet34', 'torchvision_resnet50')


@pytest.mark.parametrize('name', [pytest.param(name, marks=pytest.mark.slow)
                                  if name in SAME_CLASS_AS_ANOTHER else name for name in models.MODELS])
def test_every_model_family_and_its_twin_have_the_datas_class_count(name):
  model_config = default.get_config().model
  model_config.update(name=name, width_multiplier=0.125, depth=8, pyramid_alpha=16.0, base_width=8)
  model = builders.create_model(model_config, num_classes=100)
  logits, variables = jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), train=False))
  assert logits.shape == (2, 100)
  assert variables['params']['fc']['bias'].shape == (100,)
  twin = torch_reference.create_torch_model(model_config, num_classes=100)
  head = twin.model if name in models.PRETRAINED_FAMILIES else twin
  fc = head._fc if name == 'efficientnet_lite0' else head.fc  # the package's name  # pylint: disable=protected-access
  assert fc.out_features == 100


def test_the_twin_at_100_classes_equals_jax(tmp_path):
  """A 100-class ResNet9: JAX's weights in the torch twin give the same logits."""
  torch = pytest.importorskip('torch')
  model_config = default.get_config().model
  model_config.update(name='resnet9', width_multiplier=0.125)
  model = builders.create_model(model_config, num_classes=100)
  rng = np.random.default_rng(1)  # numpy draws: an initialiser's compile would dominate the test
  variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32) * 0.3,
                           jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                                             train=False)))
  twin = torch_reference.create_torch_model(model_config, num_classes=100).eval()
  twin.load_state_dict(torch_reference.flax_to_torch(variables), strict=True)
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  want = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, x))
  with torch.no_grad():
    got = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  assert want.shape == got.shape == (4, 100)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_finetuning_head_at_100_classes(tmp_path):
  """An ImageNet file's 1000-class head is zeroed at the data's 100 classes; a 100-class file's loads."""
  torch = pytest.importorskip('torch')
  from cifar_jax.torch_models import TORCH_MODELS  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.name = 'torchvision_resnet18'
  config.init_from.update(path=str(tmp_path / 'imagenet.pt'), layout='torchvision_resnet')
  torch.save(TORCH_MODELS['torchvision_resnet18'](num_classes=1000).state_dict(), config.init_from.path)
  loaded, zeroed = pretrained.load(config, 100)
  assert set(zeroed) == {('params', ('fc', 'kernel')), ('params', ('fc', 'bias'))}
  config.init_from.path = str(tmp_path / 'c100.pt')
  torch.save(TORCH_MODELS['torchvision_resnet18'](num_classes=100).state_dict(), config.init_from.path)
  loaded, zeroed = pretrained.load(config, 100)
  assert not zeroed and loaded[('params', ('fc', 'kernel'))].shape == (512, 100)


# Normalisation and the configs ------------------------------------------------------------------------


def test_cifar100_normalisation_in_jax_and_the_twin(tmp_path):
  """data.normalization='cifar100': the standard constants in the training batches and the eval batches,
  JAX's and the twin's alike."""
  pytest.importorskip('torch')
  x, y, _ = _images(8)
  mean, std = np.float32(ip.NORMALIZATIONS['cifar100'][0]), np.float32(ip.NORMALIZATIONS['cifar100'][1])
  want = (x.astype(np.float32) / np.float32(255.0) - mean) / std
  np.testing.assert_allclose(np.asarray(ip.normalize(jnp.asarray(x), 'cifar100')), want, rtol=1e-6, atol=1e-6)
  batch, labels = ip.get_train_batch(jnp.asarray(x), jnp.asarray(y), jnp.arange(8), 0, 8,
                                     jax.random.PRNGKey(0), augment=False, normalization='cifar100')
  np.testing.assert_allclose(np.asarray(batch), want, rtol=1e-6, atol=1e-6)
  dataset = ip.Dataset(x, y.astype(np.int32), x, y.astype(np.int32), 'test', 100)
  (got, _), = torch_reference.torch_eval_batches(dataset, 8, 'cifar100')
  np.testing.assert_allclose(got.numpy(), want.transpose(0, 3, 1, 2), rtol=1e-6, atol=1e-6)
  config = default.get_config()
  config.update(batch_size=8, seed=0)
  config.data.update(augment=False, normalization='cifar100')
  (got, _), = torch_reference.torch_batches(dataset, config, 0, 'identical')
  (native, _), = torch_reference.torch_batches(dataset, config, 0, 'native')
  order = [int(np.argmin(np.abs(want - n.numpy().transpose(1, 2, 0)).sum(axis=(1, 2, 3)))) for n in native]
  np.testing.assert_allclose(native.numpy(), want[order].transpose(0, 3, 1, 2), rtol=1e-6, atol=1e-6)
  assert got.shape == (8, 3, 32, 32)


@pytest.mark.parametrize('name', ['cifar100_one_cycle', 'cifar100_multiswag'])
def test_the_cifar100_configs(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  config_lib.validate(config)
  assert (config.data.source, config.data.tfds_name, config.data.normalization) == ('tfds', 'cifar100',
                                                                                    'cifar100')
  assert config.schedule.name == 'one_cycle' and config.schedule.max_lr == 0.1
  if name == 'cifar100_multiswag':
    assert config.num_seeds == 3 and config.swag.enabled and config.swa.start_epoch == 20


def test_normalisation_choices_are_checked():
  config = default.get_config()
  config.data.normalization = 'imagenet'
  with pytest.raises(ConfigError, match="data.normalization must be one of \\['cifar10', 'cifar100'\\]"):
    config_lib.validate(config)
  config.data.normalization = 'cifar100'
  config.model.name = 'torchvision_resnet18'
  with pytest.raises(ConfigError, match='as its pretrained weights expect'):
    config_lib.validate(config)
  config.data.normalization, config.data.tfds_name = 'cifar10', 'cifar1000'
  with pytest.raises(ConfigError, match='data.tfds_name must be one of'):
    config_lib.validate(config)


# CIFAR-100-C --------------------------------------------------------------------------------------------


def test_cifar100_c_generated_and_released(tmp_path):
  """The corruptions module makes CIFAR-100-C from CIFAR-100's test images as it makes CIFAR-10-C (the
  same 32 px images, constants and frost crops); the released CIFAR-100-C files pass its label check."""
  x, y, _ = _images(6)
  sets = corruptions.shifted_sets(x, y, ('frost', 'gaussian_noise'), (5,), seed=0)
  assert [(name, s) for name, s, _ in sets] == [('frost', 5), ('gaussian_noise', 5)]
  for name, _, images in sets:
    assert images.shape == x.shape and images.dtype == np.uint8 and not np.array_equal(images, x), name
    np.testing.assert_array_equal(images, corruptions.corrupt(x, name, 5, seed=0))
  folder = tmp_path / 'CIFAR-100-C'
  folder.mkdir()
  np.save(folder / 'labels.npy', np.tile(y, 5).astype(np.uint8))
  np.save(folder / 'fog.npy', np.concatenate([corruptions.corrupt(x, 'fog', s) for s in range(1, 6)]))
  released = corruptions.shifted_sets(x, y, ('fog',), (2,), corruptions_path=str(folder))
  np.testing.assert_array_equal(released[0][2], corruptions.corrupt(x, 'fog', 2))
  with pytest.raises(ip.DataError, match='labels are not the evaluation set'):
    corruptions.shifted_sets(x, (y + 1) % 100, ('fog',), (2,), corruptions_path=str(folder))


# A 100-class run end to end ----------------------------------------------------------------------------


def _cli(monkeypatch, capsys, *args):
  """The command line in-process on configs/tiny.py: (exit status, stderr's non-empty lines)."""
  argv = ['cifar-jax', f'--config={TINY}', *args]
  flag_values = flags.FlagValues()
  main.define_flags(flag_values)
  monkeypatch.setattr(sys, 'argv', argv)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    with pytest.raises(SystemExit) as exit_info:
      main.main(main.parse_flags(argv, flag_values), flag_values)
  finally:
    logging.set_verbosity(verbosity)
  return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _mismatch(monkeypatch, capsys, workdir, mode, *args):
  """The command line on `workdir` with 10-class synthetic data: its one line (asserted: exit 2)."""
  code, lines = _cli(monkeypatch, capsys, f'--workdir={workdir}', f'--mode={mode}', *args)
  assert code == 2 and len(lines) == 1 and lines[0].startswith('cifar-jax: error: '), (code, lines)
  return lines[0]


def test_a_100_class_run_end_to_end(tiny_config, tmp_path, monkeypatch, capsys):
  """A tiny ResNet on 100-class synthetic data, per-epoch eval on; --mode=evaluate's table and a shifted
  set; the workdir against 10-class data is one line, exit 2. (The slow test below: every row.)"""
  config = tiny_config
  config.data.synthetic_num_classes = 100
  config.data.synthetic_train_size = 128
  config.data.normalization = 'cifar100'
  config.num_epochs = 1
  config.evaluation.update(shift='gaussian_noise', severities=(3,), shift_cache='')
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(config, workdir)
  assert state.params['fc']['bias'].shape == (100,)
  records = metrics_writer.read_metrics(workdir)
  assert 0.0 < records[-1]['eval_loss'] < 3 * np.log(100)
  out = train.evaluate_checkpoint(config, workdir)
  assert [row['model'] for row in out['table']] == ['single model']
  rows = out['table'] + out['shift']['rows']
  assert [row.get('corruption') for row in rows] == [None, 'gaussian_noise']
  for row in rows:
    assert 0.0 <= row['accuracy'] <= 1.0 and 0.0 < row['nll'] < 3 * np.log(100), row
    assert 0.0 <= row['ece'] <= 1.0 and 0.0 < row['brier'] <= 2.0, row
  assert np.isclose(out['table'][0]['nll'], out['eval_loss'])
  # The evaluation normalised with CIFAR-100's constants (the config's), not CIFAR-10's.
  data = ip.load_dataset(config.data, config.seed)
  arrays = steps.batched_eval_arrays(data.eval_images, data.eval_labels, config.eval_batch_size)
  nll = {name: steps.summarize(jax.jit(functools.partial(
      steps.evaluate_variables, state.apply_fn, normalization=name))(state.params, state.batch_stats,
                                                                     *arrays))['loss']
         for name in ('cifar100', 'cifar10')}
  assert np.isclose(nll['cifar100'], out['eval_loss'], rtol=1e-5) and not np.isclose(
      nll['cifar10'], out['eval_loss'], rtol=1e-5), (nll, out['eval_loss'])
  line = _mismatch(monkeypatch, capsys, workdir, 'evaluate', '--config.data.synthetic_train_size=128')
  assert 'a 100-class model, but the data has 10 classes' in line, line


@pytest.mark.slow
def test_a_100_class_multiswag_run_every_row(tiny_config, tmp_path, monkeypatch, capsys):
  """2 seeds, SWA and SWAG on 100-class synthetic data: the six rows of the table and under shift; a
  resumed run on 10-class data is one line, exit 2."""
  config = tiny_config
  config.data.synthetic_num_classes = 100
  config.data.synthetic_train_size = 128
  config.num_epochs, config.num_seeds = 2, 2
  config.schedule.name = 'one_cycle'
  config.swa.update(enabled=True, start_epoch=1, lr=0.01)
  config.swag.update(enabled=True, rank=2, num_samples=2, samples_per_call=2)
  config.data.validation_size = 40
  config.evaluation.update(shift='gaussian_noise', severities=(3,), shift_cache='', tta='flip',
                           temperature=True, ood='noise')
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(config, workdir)
  assert state.params['fc']['bias'].shape == (2, 100)
  assert 'multiswag_eval_nll' in metrics_writer.read_metrics(workdir)[-1]
  out = train.evaluate_checkpoint(config, workdir)
  models_ = ['single model', 'deep ensemble', 'SWA', 'MultiSWA', 'SWAG', 'MultiSWAG']
  assert [row['model'] for row in out['table']] == models_
  assert [row['model'] for row in out['shift']['rows']] == models_
  for row in out['table'] + out['shift']['rows']:
    assert 0.0 <= row['accuracy'] <= 1.0 and 0.0 < row['nll'] < 3 * np.log(100), row
  # Every row with TTA's views, its temperature and its OOD scores against noise, over 100 classes.
  assert [row['model'] for row in out['temperature']['rows']] == models_
  for row, plain in zip(out['temperature']['rows'], out['table']):
    assert row['temperature'] > 0 and row['nll'] <= plain['nll'] + 1e-6, (row, plain)
  assert {row['model'] for row in out['ood']['rows']} == set(models_)
  assert all(0.0 <= row['auroc'] <= 1.0 for row in out['ood']['rows'])
  json.dumps(out)
  line = _mismatch(monkeypatch, capsys, workdir, 'train', '--config.data.synthetic_train_size=128',
                   '--config.num_epochs=3', '--config.num_seeds=2', '--config.schedule.name=one_cycle',
                   '--config.swa.enabled=True', '--config.swa.start_epoch=1', '--config.swag.enabled=True',
                   '--config.swag.rank=2', '--config.swag.num_samples=2', '--config.swag.samples_per_call=2')
  assert 'a 100-class model, but the data has 10 classes' in line, line


def test_bad_cifar100_input_is_one_line(tmp_path, monkeypatch, capsys):
  """Labels outside the class count (the pickles', an npz's stated one), a missing folder, an unknown
  TFDS name: one line, exit 2, before anything compiles."""
  folder = str(tmp_path / 'cifar-100-python')
  write_cifar100_python(folder, fine=100)
  npz = str(tmp_path / 'd.npz')
  x, _, _ = _images(4)
  np.savez(npz, x_train=x, y_train=np.array([0, 3, 20, 1]), num_classes=20)
  workdir = f'--workdir={tmp_path / "run"}'
  for args, fragment in (
      (('--config.data.source=cifar100_python', f'--config.data.path={folder}'),
       'labels must lie in 0..99 (100 classes), got '),
      (('--config.data.source=npz', f'--config.data.path={npz}'),
       'labels must lie in 0..19 (20 classes), got 0..20'),
      (('--config.data.source=cifar100_python', f'--config.data.path={tmp_path / "nowhere"}'),
       'cifar100_python needs the cifar-100-python folder'),
      (('--config.data.source=tfds', '--config.data.tfds_name=cifar1000'), 'data.tfds_name must be one of'),
  ):
    code, lines = _cli(monkeypatch, capsys, workdir, *args)
    assert code == 2 and len(lines) == 1 and fragment in lines[0], (args, code, lines)
