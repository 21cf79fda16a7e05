"""Label smoothing (`loss.label_smoothing`), Cutout (`data.cutout`) and CutMix (`data.cutmix`,
cifar_jax/augmentations.py): the loss is torch's, the squares and boxes lie where DeVries & Taylor's and Yun
et al.'s code puts them, the mixed loss is the formula, the draws are a function of (seed, epoch, step)
(so k seeds, a resume and 1 or 4 devices draw the same), the torch twin gets the same batches and follows
the trainer's steps, and bad values are one line, exit 2."""

import functools
import json
import os
import subprocess
import sys

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_errors import assert_user_error
from test_errors import cli  # noqa: F401  (the fixture)

from cifar_jax import augmentations
from cifar_jax import builders
from cifar_jax import config_lib
from cifar_jax import input_pipeline
from cifar_jax import steps
from cifar_jax.errors import ConfigError
from configs import tiny

torch = pytest.importorskip('torch')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUTMIX = augmentations.CutMix(alpha=1.0, prob=1.0, switch_prob=0.5)


def torch_ce(logits, labels, eps):
  return torch.nn.CrossEntropyLoss(label_smoothing=eps)(torch.from_numpy(np.asarray(logits)),
                                                        torch.from_numpy(np.asarray(labels, np.int64))).item()


@pytest.mark.parametrize('eps', [0.0, 0.1, 0.2, 0.6])
def test_label_smoothing_is_torchs(eps):
  logits = 3.0 * jax.random.normal(jax.random.key(0), (64, 10))
  labels = jax.random.randint(jax.random.key(1), (64,), 0, 10)
  got = float(steps.cross_entropy_loss(logits, labels, eps))
  np.testing.assert_allclose(got, torch_ce(logits, labels, eps), rtol=2e-6)
  # the mixed loss (mixup's and CutMix's) is lam * CE_eps(labels) + (1 - lam) * CE_eps(partners)
  partners = jnp.roll(labels, 5)
  lam = jnp.full((64,), 0.3)
  want = 0.3 * torch_ce(logits, labels, eps) + 0.7 * torch_ce(logits, partners, eps)
  np.testing.assert_allclose(float(steps.mixup_loss(logits, labels, partners, lam, eps)), want, rtol=2e-6)


def test_cutout_zeroes_clipped_squares_centred_anywhere():
  n, size, count = 512, 16, 2
  boxes = np.asarray(augmentations.cutout_boxes(jax.random.key(0), n, size, count, 32, 32))
  assert boxes.shape == (count, n, 4)
  y1, y2, x1, x2 = np.moveaxis(boxes, -1, 0)
  assert np.all((0 <= y1) & (y1 < y2) & (y2 <= 32) & (0 <= x1) & (x1 < x2) & (x2 <= 32))
  assert np.all((y2 - y1 <= size) & (x2 - x1 <= size))
  # the centre is anywhere in the image: squares clipped at every edge, and whole ones in the middle
  assert np.any(y1 == 0) and np.any(y2 == 32) and np.any(x1 == 0) and np.any(x2 == 32)
  assert np.any((y2 - y1 == size) & (x2 - x1 == size))
  assert np.min(y2 - y1) == size // 2 and np.max(y2 - y1) == size  # a centre at 0 keeps half
  images = jax.random.normal(jax.random.key(1), (n, 32, 32, 3)) + 5.0  # no zeros of its own
  out = np.asarray(augmentations.cutout(images, jax.random.key(0), size, count))
  masked = np.zeros((n, 32, 32), bool)
  for c in range(count):
    for i in range(n):
      masked[i, y1[c, i]:y2[c, i], x1[c, i]:x2[c, i]] = True
  np.testing.assert_array_equal(out == 0, np.broadcast_to(masked[..., None], out.shape))
  np.testing.assert_array_equal(out[~masked], np.asarray(images)[~masked])
  # odd sizes keep DeVries & Taylor's [c - size // 2, c + size // 2): an even side of size - 1
  odd = np.asarray(augmentations.cutout_boxes(jax.random.key(2), n, 7, 1, 32, 32))
  assert np.max(odd[..., 1] - odd[..., 0]) == 6


def numbered_batch(n=32):
  """Images whose every pixel is the image's index: a mixed pixel says where it came from."""
  images = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None], (n, 32, 32, 3))
  return images, jnp.arange(n) % 10


def partners_and_box(images, mixed):
  """(each image's partner, the pasted box (y1, y2, x1, x2)), or Nones, of a CutMix `numbered_batch`."""
  own = np.asarray(images)[..., 0]
  pasted = np.asarray(mixed)[..., 0] != own
  rows, cols = np.nonzero(pasted.any(0))
  if not rows.size:
    return None, None
  box = (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
  partners = np.asarray(mixed)[:, box[0], box[2], 0].astype(int)
  return partners, box


def test_cutmix_pastes_one_clipped_box_and_corrects_lam():
  images, labels = numbered_batch()
  seen_clipped = seen_whole = 0
  for k in range(60):
    mixed, ys, partner_labels, lam = augmentations.cutmix(images, labels, jax.random.key(k), CUTMIX)
    lam0 = float(lam[0])
    assert np.all(np.asarray(lam) == lam0) and 0 <= lam0 <= 1
    np.testing.assert_array_equal(ys, labels)
    partners, box = partners_and_box(images, mixed)
    if box is None:  # a box of no area (a cut of 0 or 1 px) or all images their own partners
      assert lam0 == 1.0 or np.array_equal(partner_labels, labels)
      continue
    y1, y2, x1, x2 = box
    # one box for the batch, every pixel in it from the partner, every pixel outside the image's own
    inside = np.zeros((32, 32), bool)
    inside[y1:y2, x1:x2] = True
    want = np.where(inside, partners[:, None, None], np.arange(32)[:, None, None])
    np.testing.assert_array_equal(np.asarray(mixed)[..., 0], want)
    assert sorted(partners) == list(range(32))  # a permutation
    np.testing.assert_array_equal(partner_labels, np.asarray(labels)[partners])
    np.testing.assert_allclose(lam0, 1 - (y2 - y1) * (x2 - x1) / 1024, rtol=1e-6)  # the clipped area
    clipped = y1 == 0 or x1 == 0 or y2 == 32 or x2 == 32
    seen_clipped += clipped
    seen_whole += not clipped
  assert seen_clipped and seen_whole


def test_cutmix_box_is_rand_bbox():
  """The box of lam: cut int(32 sqrt(1 - lam)), half of it (floored) either side of the centre, clipped."""
  for k in range(50):
    lam = jax.random.uniform(jax.random.key(100 + k))
    box, corrected = augmentations.cutmix_box(jax.random.key(k), lam, 32, 32)
    cy, cx = np.asarray(jax.random.randint(jax.random.key(k), (2,), 0, jnp.array([32, 32])))
    cut = int(32 * np.sqrt(1 - np.float32(lam)))
    want = [np.clip(cy - cut // 2, 0, 32), np.clip(cy + cut // 2, 0, 32),
            np.clip(cx - cut // 2, 0, 32), np.clip(cx + cut // 2, 0, 32)]
    np.testing.assert_array_equal(box, want)
    np.testing.assert_allclose(corrected, 1 - (want[1] - want[0]) * (want[3] - want[2]) / 1024, rtol=1e-6)


def test_cutmix_probability_and_switch_with_mixup():
  images, labels = numbered_batch()
  kinds = {'plain': 0, 'cutmix': 0, 'mixup': 0}
  for k in range(200):
    mixed, _, _, lam = augmentations.cutmix(images, labels, jax.random.key(k),
                                            augmentations.CutMix(1.0, 0.8, 0.25), mixup_alpha=1.0)
    mixed, lam0 = np.asarray(mixed), float(lam[0])
    if lam0 == 1.0 or np.array_equal(mixed, images):
      kinds['plain'] += 1
    elif np.all(np.isin(mixed, np.arange(32))):  # whole pixels: pasted
      kinds['cutmix'] += 1
    else:  # blended everywhere
      kinds['mixup'] += 1
  # P(plain) = 0.2, P(cutmix) = 0.8 * 0.25 = 0.2, P(mixup) = 0.6: each within 5 sigma of 200 draws
  assert abs(kinds['plain'] - 40) < 29 and abs(kinds['cutmix'] - 40) < 29 and abs(kinds['mixup'] - 120) < 35
  never = augmentations.cutmix(images, labels, jax.random.key(0), augmentations.CutMix(1.0, 0.0, 0.5))
  np.testing.assert_array_equal(never[0], images)
  assert np.all(np.asarray(never[3]) == 1.0)


@functools.cache
def drawer(**options):
  """(data key, epoch, index) -> `steps.draw_batch` of 16 synthetic images, jitted once per options."""
  data = input_pipeline.make_synthetic(64, 0)
  images, labels = jnp.asarray(data['x_train']), jnp.asarray(data['y_train'])
  return jax.jit(lambda key, epoch, index: steps.draw_batch(
      images, labels, jnp.arange(64), key, epoch, index, batch_size=16, size=16, augment=True, **options))


def draw(key=None, epoch=2, index=3, **options):
  return drawer(**options)(jax.random.key(1) if key is None else key, epoch, index)


def test_draws_are_a_function_of_the_data_key_epoch_and_step():
  options = dict(cutout=augmentations.Cutout(16, 1), cutmix=CUTMIX, mixup_alpha=0.2)
  batch = draw(**options)
  plain = draw()
  # the plain batch's crops and flips, then Cutout and CutMix with the batch key's salted keys
  key = input_pipeline.batch_key(jax.random.key(1), 2, 3)
  cut = augmentations.cutout(plain[0], jax.random.fold_in(key, augmentations.CUTOUT_SALT), 16, 1)
  want = augmentations.cutmix(cut, plain[1], jax.random.fold_in(key, augmentations.CUTMIX_SALT), CUTMIX, 0.2)
  np.testing.assert_allclose(batch[0], want[0], rtol=1e-6, atol=1e-7)  # jitted and eager: float32 rounding
  for got, expected in zip(batch[1:], want[1:]):
    np.testing.assert_array_equal(got, expected)
  for got, again in zip(batch, draw(**options)):
    np.testing.assert_array_equal(got, again)
  assert not np.array_equal(batch[0], draw(index=4, **options)[0])
  assert not np.array_equal(batch[0], draw(epoch=1, **options)[0])
  # k seeds: the step vmaps the draw over the seeds' data keys; seed i draws what its single run draws
  keys = jnp.stack([jax.random.key(1), jax.random.key(7)])
  stacked = jax.jit(jax.vmap(lambda k: drawer(**options)(k, 2, 3)))(keys)
  for i, key in enumerate((jax.random.key(1), jax.random.key(7))):
    for got, single in zip(stacked, draw(key=key, **options)):
      np.testing.assert_allclose(got[i], single, rtol=1e-6, atol=1e-6)


def test_config_fields_reach_the_step():
  config = tiny.get_config()
  assert augmentations.batch_options(config) == {'cutout': None, 'cutmix': None}
  assert augmentations.label_smoothing(config) == 0.0
  config.data.cutout.enabled = config.data.cutmix.enabled = True
  config.data.cutout.size, config.data.cutmix.switch_prob = 12, 0.7
  config.loss.label_smoothing = 0.2
  assert augmentations.batch_options(config) == {
      'cutout': augmentations.Cutout(12, 1), 'cutmix': augmentations.CutMix(1.0, 1.0, 0.7)}
  assert augmentations.label_smoothing(config) == 0.2


def test_the_modern_recipe_is_one_cycle_30_with_smoothing_cutout_and_ema():
  from cifar_jax import ema  # pylint: disable=g-import-not-at-top
  from configs import modern_recipe  # pylint: disable=g-import-not-at-top
  from configs import one_cycle_30  # pylint: disable=g-import-not-at-top

  config, base = modern_recipe.get_config(), one_cycle_30.get_config()
  config_lib.validate(config)
  assert augmentations.label_smoothing(config) == 0.1
  assert augmentations.batch_options(config) == {'cutout': augmentations.Cutout(16, 1), 'cutmix': None}
  assert ema.from_config(config) == ema.Ema(decay=0.999, warmup=True, every_steps=1, batch_stats='average')
  for name in ('loss', 'data', 'ema'):
    config[name], base[name] = None, None
  assert config == base  # nothing else differs from the one-cycle baseline


def test_a_run_saved_before_the_fields_resumes_quietly_and_a_change_is_announced():
  from cifar_jax import checkpointing  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  saved = json.loads(config.to_json_best_effort())
  del saved['loss'], saved['data']['cutout'], saved['data']['cutmix']
  assert checkpointing.compare_with_saved(config, saved) == ([], [])
  config.loss.label_smoothing, config.data.cutout.enabled = 0.1, True
  assert checkpointing.compare_with_saved(config, saved) == (
      [], ['data.cutout.enabled: False -> True', 'loss.label_smoothing: 0.0 -> 0.1'])


@pytest.mark.parametrize('field, value, fragment', [
    ('loss.label_smoothing', 1.0, 'loss.label_smoothing must be in [0, 1)'),
    ('loss.label_smoothing', -0.1, 'loss.label_smoothing must be in [0, 1)'),
    ('data.cutout.size', 33, 'data.cutout.size must be an integer from 1 to the image size 32'),
    ('data.cutout.size', 0, 'data.cutout.size must be an integer from 1'),
    ('data.cutout.count', 0, 'data.cutout.count must be an integer >= 1'),
    ('data.cutmix.alpha', 0.0, 'data.cutmix.alpha must be > 0'),
    ('data.cutmix.prob', 1.5, 'data.cutmix.prob must be a probability in [0, 1]'),
    ('data.cutmix.switch_prob', -0.5, 'data.cutmix.switch_prob must be a probability in [0, 1]'),
])
def test_bad_values_are_config_errors(field, value, fragment):
  config = tiny.get_config()
  config.data.cutout.enabled = config.data.cutmix.enabled = True
  parent, _, leaf = field.rpartition('.')
  config_lib.field_value(config, parent)[leaf] = value
  with pytest.raises(ConfigError) as error:
    config_lib.validate(config)
  assert fragment in str(error.value) and '\n' not in str(error.value)


@pytest.mark.parametrize('args, fragment', [
    (['--config.loss.label_smoothing=1.0'], 'loss.label_smoothing'),
    (['--config.data.cutout.enabled=True', '--config.data.cutout.size=40'], 'data.cutout.size'),
    (['--config.data.cutmix.enabled=True', '--config.data.cutmix.alpha=-1'], 'data.cutmix.alpha'),
])
def test_bad_values_are_one_line_exit_2(cli, args, fragment):  # noqa: F811
  assert_user_error(cli(*args), fragment, 'got')


# The torch twin ------------------------------------------------------------------------------------------


def twin_config():
  from configs import smoke  # pylint: disable=g-import-not-at-top

  config = smoke.get_config()
  config.seed, config.num_epochs, config.batch_size = 3, 1, 8
  config.model.width_multiplier = 0.125
  config.data.synthetic_train_size, config.data.synthetic_eval_size = 32, 8  # 4 steps of 8
  config.data.cutout.enabled = config.data.cutmix.enabled = True
  config.data.cutout.size = 12
  config.data.mixup = 0.5
  config.loss.label_smoothing = 0.2
  return config


def identical_batches(config):
  """(dataset, data key, epoch 0's order, the twin's 'identical' batches of epoch 0)."""
  from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top

  dataset = input_pipeline.load_dataset(config.data, config.seed)
  data_key = torch_reference.jax_data_key(config.seed)
  perm = input_pipeline.epoch_permutation(data_key, 0, dataset.num_train)
  batches = list(torch_reference.torch_batches(dataset, config, 0, 'identical', mixup_alpha=0.5,
                                               **augmentations.batch_options(config)))
  return dataset, data_key, perm, batches


def test_the_twins_identical_batches_are_the_trainers():
  """'identical' mode hands the twin the trainer's batches: its squares, boxes, lambdas and partners."""
  config = twin_config()
  config.data.synthetic_train_size = 16  # 2 batches
  dataset, data_key, perm, batches = identical_batches(config)
  assert len(batches) == 2 and all(len(b) == 4 for b in batches) and batches[0][3] != batches[1][3]
  x, y, partners, lam = batches[1]
  want = steps.draw_batch(dataset.train_images, dataset.train_labels, perm, data_key, 0, 1, batch_size=8,
                          size=8, augment=True, mixup_alpha=0.5, **augmentations.batch_options(config))
  np.testing.assert_array_equal(x.numpy(), np.asarray(want[0]).transpose(0, 3, 1, 2))
  np.testing.assert_array_equal(y.numpy(), want[1])
  np.testing.assert_array_equal(partners.numpy(), want[2])
  assert lam == float(want[3][0])


@pytest.mark.slow  # ~45 s of CPU: the step's compilation
def test_the_trainers_steps_follow_the_twin_on_identical_batches():
  """The twin's `train_epoch` on the 'identical' batches (torch's label-smoothed loss, Cutout, CutMix
  switching with mixup) and the trainer's jitted steps end an epoch of 4 steps at the same loss, params and
  BatchNorm statistics."""
  from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top

  config = twin_config()
  options = augmentations.batch_options(config)
  dataset, data_key, perm, batches = identical_batches(config)
  torch.manual_seed(0)
  model = torch_reference.create_torch_model(config.model)
  variables = torch_reference.torch_to_flax(model.state_dict())
  optimizer = torch_reference.create_torch_optimizer(model.parameters(), config.optimizer)
  record = torch_reference.train_epoch(model, optimizer, batches, 'cpu', label_smoothing=0.2)
  lr_fn, momentum_fn = builders.create_schedules(config, 4)
  state = builders.create_train_state(jax.random.key(0), config, builders.create_model(config.model),
                                      lr_fn, momentum_fn)
  state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'])
  acc = steps.init_train_metrics()
  step = jax.jit(functools.partial(steps.train_step_on_device_data, steps_per_epoch=4, batch_size=8, size=8,
                                   augment=True, mixup_alpha=0.5, label_smoothing=0.2, **options))
  for _ in range(4):
    state, acc = step(state, acc, dataset.train_images, dataset.train_labels, perm, data_key)
  loss = float(acc['loss_sum'] / acc['count'])
  assert abs(loss - record['train_loss']) <= 1e-4 * abs(record['train_loss'])
  want = torch_reference.torch_to_flax(model.state_dict())
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
               (state.params, state.batch_stats), (want['params'], want['batch_stats']))


def test_the_twins_native_batches_cut_and_mix_as_the_papers():
  """'native' mode: torch's own draws, DeVries & Taylor's squares (mean colour, i.e. zero after
  normalisation) and Yun et al.'s box pasted from the partner with lam its clipped area."""
  from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top

  config = twin_config()
  config.data.mixup, config.data.cutout.enabled = 0.0, False
  dataset = input_pipeline.load_dataset(config.data, config.seed)
  plain = list(torch_reference.torch_batches(dataset, config, 0, 'native'))
  cutmix = list(torch_reference.torch_batches(dataset, config, 0, 'native',
                                              **augmentations.batch_options(config)))
  assert all(0 <= b[3] <= 1 for b in cutmix) and len({b[3] for b in cutmix}) > 1
  # the first batch (later ones differ: the partners' randperm advances the torch generator)
  (x0, y0), (x, y, partners, lam) = plain[0], cutmix[0]
  np.testing.assert_array_equal(y, y0)
  rows, cols = np.nonzero((x != x0).any(1).any(0).numpy())  # the pixels an image took from its partner
  y1, y2, x1, x2 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
  assert lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 1024)
  box = lambda t: t[..., y1:y2, x1:x2].flatten(start_dim=-3)
  order = [int(np.nonzero((box(x0) == box(x[i])).all(-1).numpy())[0][0]) for i in range(8)]
  np.testing.assert_array_equal(partners.numpy(), y0.numpy()[order])
  inside = torch.zeros(32, 32, dtype=torch.bool)
  inside[y1:y2, x1:x2] = True
  np.testing.assert_array_equal(x.numpy(), torch.where(inside, x0[order], x0).numpy())
  config.data.cutout.enabled, config.data.cutmix.enabled = True, False
  options = augmentations.batch_options(config)
  cut = list(torch_reference.torch_batches(dataset, config, 0, 'native', **options))
  for (x0, _), (x, _) in zip(plain, cut):
    zeroed = (x == 0).all(1).numpy() & ~(x0 == 0).all(1).numpy()
    for image in zeroed:
      rows, cols = np.nonzero(image)
      assert rows.size and rows.max() - rows.min() < 12 and cols.max() - cols.min() < 12
    kept = ~(x == 0).all(1, keepdim=True).expand_as(x)
    np.testing.assert_array_equal(x[kept].numpy(), x0[kept].numpy())


# Runs ------------------------------------------------------------------------------------------------------


def regularized(config):
  config.data.cutout.enabled = config.data.cutmix.enabled = True
  config.data.cutout.size = 8
  config.data.mixup = 0.2
  config.loss.label_smoothing = 0.1
  return config


@pytest.mark.slow  # ~40 s of CPU: three runs of the tiny config
def test_k_seeds_and_a_resume_train_as_the_single_run(tmp_path):
  """Seed i of a k = 2 run with label smoothing, Cutout and CutMix switching with mixup trains as the single
  run of seed i, within float32 rounding; a run killed mid-epoch resumes bitwise."""
  config = regularized(tiny.get_config())
  config.num_epochs = 2
  conftest.assert_k_seeds_train_as_singles_and_resume(config, tmp_path)


def _four_device_run(workdir: str) -> None:
  """The subprocess: the regularised tiny run under jit and pmap over 4 virtual devices."""
  from cifar_jax import train  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 4
  for mode in ('jit', 'pmap'):
    config = regularized(tiny.get_config())
    config.num_epochs, config.parallelism = 1, mode
    state = train.train_and_evaluate(config, os.path.join(workdir, mode))
    np.savez(os.path.join(workdir, f'{mode}.npz'),
             *[np.asarray(x.addressable_shards[0].data) for x in jax.tree.leaves(state.params)])


@pytest.mark.slow  # ~60 s of CPU: a 4-device subprocess compiles two runs
def test_one_and_four_devices_draw_and_train_the_same(tmp_path):
  from cifar_jax import train  # pylint: disable=g-import-not-at-top

  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  config = regularized(tiny.get_config())
  config.num_epochs = 1
  one = jax.tree.leaves(train.train_and_evaluate(config, str(tmp_path / 'one')).params)
  for mode in ('jit', 'pmap'):
    with np.load(tmp_path / f'{mode}.npz', allow_pickle=False) as four:
      for i, leaf in enumerate(one):
        np.testing.assert_allclose(four[f'arr_{i}'], leaf, rtol=1e-5, atol=1e-5, err_msg=mode)


if __name__ == '__main__':
  _four_device_run(sys.argv[1])
  print(json.dumps({'ok': True}))
