"""BiT's mixup (`data.mixup`, steps.mixup / mixup_loss): the mixed batch and its loss are the formulas of
big_transfer's bit_pytorch/train.py, the draws are a function of (seed, epoch, batch), and a run trains."""

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cifar_jax import config_lib
from cifar_jax import input_pipeline
from cifar_jax import steps
from cifar_jax import train
from cifar_jax.errors import ConfigError
from configs import tiny


def test_mixup_mixes_each_image_with_its_partner():
  n = 16
  images = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None], (n, 4, 4, 3))
  labels = jnp.arange(n) % 10
  mixed, ys, partner_labels, lam = steps.mixup(images, labels, jax.random.key(3), 0.1)
  lam0 = float(lam[0])
  assert 0 < lam0 < 1 and np.all(np.asarray(lam) == lam0) and lam.shape == (n,)
  np.testing.assert_array_equal(ys, labels)
  partners = (np.asarray(mixed[:, 0, 0, 0]) - lam0 * np.arange(n)) / (1 - lam0)
  partners = np.rint(partners).astype(int)
  assert sorted(partners) == list(range(n)) and not np.array_equal(partners, np.arange(n))  # a permutation
  np.testing.assert_array_equal(partner_labels, np.asarray(labels)[partners])
  np.testing.assert_allclose(mixed, lam0 * images + (1 - lam0) * images[partners], rtol=1e-6)
  # the same key, the same draws; Beta(0.1, 0.1) puts most weight near 0 and 1
  np.testing.assert_array_equal(steps.mixup(images, labels, jax.random.key(3), 0.1)[0], mixed)
  draws = [float(steps.mixup(images, labels, jax.random.key(k), 0.1)[3][0]) for k in range(200)]
  assert np.mean([min(d, 1 - d) < 0.1 for d in draws]) > 0.5


def test_mixup_loss_is_bits_criterion():
  logits = jax.random.normal(jax.random.key(0), (8, 10))
  a, b = jnp.arange(8) % 10, (jnp.arange(8) * 3 + 1) % 10
  lam = jnp.full((8,), 0.3)
  ce = lambda y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  np.testing.assert_allclose(steps.mixup_loss(logits, a, b, lam), 0.3 * ce(a) + 0.7 * ce(b), rtol=1e-6)


def test_draw_batch_mixes_only_when_asked():
  data = input_pipeline.make_synthetic(64, 0)
  images, labels = jnp.asarray(data['x_train']), jnp.asarray(data['y_train'])
  perm = jnp.arange(64)
  key = jax.random.key(1)
  plain = steps.draw_batch(images, labels, perm, key, 2, 3, batch_size=16, size=16, augment=True)
  mixed = steps.draw_batch(images, labels, perm, key, 2, 3, batch_size=16, size=16, augment=True,
                           mixup_alpha=0.2)
  assert len(plain) == 2 and len(mixed) == 4
  # the plain batch (the same crops and flips) mixed with the batch key's salted draws
  salted = jax.random.fold_in(input_pipeline.batch_key(key, 2, 3), steps.MIXUP_SALT)
  for got, want in zip(mixed, steps.mixup(*plain, salted, 0.2)):
    np.testing.assert_array_equal(got, want)
  other = steps.draw_batch(images, labels, perm, key, 2, 4, batch_size=16, size=16, augment=True,
                           mixup_alpha=0.2)
  assert float(other[3][0]) != float(mixed[3][0])  # each batch its own draw


@pytest.mark.parametrize('value', [-0.1, float('nan')])
def test_bad_mixup_is_one_line(value):
  config = tiny.get_config()
  config.data.mixup = value
  with pytest.raises(ConfigError, match='data.mixup must be >= 0'):
    config_lib.validate(config)


def test_a_mixup_run_trains_and_differs_from_a_plain_one(tmp_path):
  config = tiny.get_config()
  config.num_epochs = 1
  plain = train.train_and_evaluate(config, str(tmp_path / 'plain'))
  config.data.mixup = 0.1
  mixed = train.train_and_evaluate(config, str(tmp_path / 'mixed'))
  leaves = zip(jax.tree.leaves(plain.params), jax.tree.leaves(mixed.params))
  assert all(np.all(np.isfinite(np.asarray(b))) for _, b in leaves)
  assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                 for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(mixed.params)))


@pytest.mark.slow  # default suite under 15 minutes: `make test-slow`
def test_k_seeds_and_a_resume_mix_as_the_single_run(tmp_path):
  """Seed i of a k = 2 run trains as the single run of seed + i (the mixup draws come from each seed's
  data key), within float32 rounding; a run killed mid-epoch resumes bitwise."""
  config = tiny.get_config()
  config.num_epochs = 2
  config.data.mixup = 0.2
  conftest.assert_k_seeds_train_as_singles_and_resume(config, tmp_path)
