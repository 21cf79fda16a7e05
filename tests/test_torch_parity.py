"""The Flax model, optimiser and batches against the blog's torch reference (cifar_jax/torch_reference.py).

Errors are `max |jax - torch| / max |torch|` per tensor. Both sides compute in float32 with different
summation orders (XLA vs oneDNN convolutions, reductions), so results agree to a few float32 ULPs of the
largest value, amplified by depth and by BatchNorm's division by small batch stds: measured about 1e-6 for
logits, so 1e-5 leaves a 10x margin while still catching any real semantic difference (a wrong padding,
eps, biased variance or momentum convention shows up at 1e-3 or more).
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')

from cifar_jax import builders
from cifar_jax import input_pipeline  # pylint: disable=g-import-not-at-top
from cifar_jax import models
from cifar_jax import steps
from cifar_jax import torch_reference
from configs import smoke

WIDTH = 0.125  # stage widths 8/16/32/64: GroupNorm still has groups of 4
BATCH = 8
LOGITS_RTOL = 1e-5  # float32, ~10 layers of differently ordered sums: measured ~1e-6
STATS_RTOL = 1e-5  # running mean/var after one forward: measured ~1e-7
SGD_RTOL = 1e-5  # loss, params and BN stats after each of two SGD steps: measured ~2e-7
GRAD_RTOL = 5e-5  # gradients (through BN/GN and WS) and momentum buffers, per tensor: measured ~6e-6
MODELS = ('resnet9', 'resnet18')


def rel_err(a, b) -> float:
  """max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def model_config(name, norm, zero_init_residual=False):
  config = smoke.get_config().model
  config.name, config.norm, config.width_multiplier = name, norm, WIDTH
  config.zero_init_residual = zero_init_residual
  return config


def flax_model(config):
  return models.create_model(config.name, width_multiplier=config.width_multiplier, norm=config.norm,
                             zero_init_residual=config.zero_init_residual)


def images(seed, n=BATCH):
  return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def perturbed_torch_model(config, seed=0):
  """A torch model with random norm affines and, for BN, running stats from three train forwards."""
  torch.manual_seed(seed)
  model = torch_reference.create_torch_model(config)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
    model.train()
    for i in range(3):
      model(nchw(images(100 + i)))
  return model


def flax_shapes(config):
  """The model's variables as ShapeDtypeStructs (traced, not compiled: random init is slow on CPU)."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(functools.partial(flax_model(config).init, train=False), jax.random.key(0), x)


def perturbed_flax_variables(config, seed=0):
  """Flax-side variables drawn in numpy: He-normal kernels, random norm affines and BN statistics."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel' and len(shape) == 4:  # HWIO, fan_out = H * W * O
      value = rng.normal(0.0, np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])), shape)
    elif path[-2].key == 'fc':
      value = rng.uniform(-shape[0] ** -0.5, shape[0] ** -0.5, shape)
    elif name == 'scale':
      value = rng.uniform(0.5, 1.5, shape)
    elif name == 'var':
      value = rng.uniform(0.5, 2.0, shape)
    else:  # norm bias, running mean
      value = rng.normal(0.0, 0.2, shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, dict(flax_shapes(config)))


def torch_logits(model, x, train):
  model.train(train)
  with torch.no_grad():
    return model(nchw(x)).numpy()


def flax_logits(config, variables, x, train):
  out, updates = flax_model(config).apply(variables, x, train=train, mutable=['batch_stats'])
  return np.asarray(out), updates


CASES = [(name, 'batch', train) for name in MODELS for train in (True, False)]
CASES += [(name, 'group_ws', True) for name in MODELS]
# The reverse direction shares the forward pass; these cover each module kind and both BN modes.
REVERSE_CASES = [('resnet9', 'batch', True), ('resnet18', 'batch', False), ('resnet18', 'group_ws', True)]


@pytest.mark.parametrize('name,norm,train', CASES)
def test_forward_torch_weights_in_flax(name, norm, train):
  config = model_config(name, norm)
  model = perturbed_torch_model(config)
  variables = torch_reference.torch_to_flax(model.state_dict())
  x = images(1)
  got, _ = flax_logits(config, variables, x, train)
  want = torch_logits(model, x, train)
  assert got.shape == want.shape == (BATCH, 10)
  assert rel_err(got, want) < LOGITS_RTOL


@pytest.mark.parametrize('name,norm,train', REVERSE_CASES)
def test_forward_flax_weights_in_torch(name, norm, train):
  config = model_config(name, norm)
  variables = perturbed_flax_variables(config)
  model = torch_reference.create_torch_model(config)
  model.load_state_dict(torch_reference.flax_to_torch(variables), strict=True)
  x = images(2)
  got, _ = flax_logits(config, variables, x, train)
  assert rel_err(got, torch_logits(model, x, train)) < LOGITS_RTOL


@pytest.mark.parametrize('name', MODELS)
def test_batch_stats_match_torch_running_stats(name):
  config = model_config(name, 'batch')
  model = perturbed_torch_model(config)
  variables = torch_reference.torch_to_flax(model.state_dict())
  x = images(3)
  _, updates = flax_logits(config, variables, x, train=True)
  torch_logits(model, x, train=True)
  want = torch_reference.torch_to_flax(model.state_dict())['batch_stats']
  errors = jax.tree.map(rel_err, updates['batch_stats'], want)
  assert jax.tree.structure(errors) == jax.tree.structure(want)
  assert max(jax.tree.leaves(errors)) < STATS_RTOL


# GN + WS gradients are checked in the slow run: its forward parity is checked above, and the compile
# would add ~6 s to the default run on a 2-core CPU.
@pytest.mark.parametrize('norm', ('batch', pytest.param('group_ws', marks=pytest.mark.slow)))
def test_sgd_steps_match_torch(norm):
  """Two steps on one batch (the second exercises the momentum buffer), coupled weight decay."""
  lr, momentum, wd = 0.05, 0.9, 5e-4
  config = model_config('resnet9', norm, zero_init_residual=True)
  model = perturbed_torch_model(config)
  variables = torch_reference.torch_to_flax(model.state_dict())
  x = images(4)
  y = np.random.default_rng(4).integers(0, 10, BATCH)

  fmodel = flax_model(config)
  tx = optax.chain(optax.add_decayed_weights(wd), optax.trace(momentum),
                   optax.scale_by_learning_rate(lr))

  @jax.jit
  def step(params, state, opt_state):
    def loss_fn(p):
      logits, updates = fmodel.apply({'params': p, **state}, x, train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    changes, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, changes), dict(updates), opt_state, loss, grads

  params = variables['params']
  state = {k: v for k, v in variables.items() if k != 'params'}
  opt_state = tx.init(params)
  optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
  model.train()
  for _ in range(2):
    params, state, opt_state, loss, grads = step(params, state, opt_state)
    optimizer.zero_grad()
    torch_loss = torch.nn.functional.cross_entropy(model(nchw(x)), torch.from_numpy(y))
    torch_loss.backward()
    optimizer.step()
    want = torch_reference.torch_to_flax(model.state_dict())
    assert rel_err(loss, torch_loss.item()) < SGD_RTOL
    assert max(jax.tree.leaves(jax.tree.map(rel_err, params, want['params']))) < SGD_RTOL
    # Gradients and momentum buffers, which the parameters' magnitude would otherwise hide.
    torch_grads = torch_reference.torch_to_flax({k: p.grad for k, p in model.named_parameters()})
    buffers = torch_reference.torch_to_flax(
        {k: optimizer.state[p]['momentum_buffer'] for k, p in model.named_parameters()})
    assert max(jax.tree.leaves(jax.tree.map(rel_err, grads, torch_grads['params']))) < GRAD_RTOL
    trace = opt_state[1].trace
    assert max(jax.tree.leaves(jax.tree.map(rel_err, trace, buffers['params']))) < GRAD_RTOL
    if norm == 'batch':
      stats = jax.tree.map(rel_err, state['batch_stats'], want['batch_stats'])
      assert max(jax.tree.leaves(stats)) < SGD_RTOL


@pytest.mark.parametrize('norm', ('batch', 'group_ws'))
def test_porting_round_trip_is_exact(norm):
  config = model_config('resnet18', norm)
  model = perturbed_torch_model(config)
  state = model.state_dict()
  variables = torch_reference.torch_to_flax(state)
  assert ('batch_stats' in variables) == (norm == 'batch')
  nbt = 3 if norm == 'batch' else 0
  back = torch_reference.flax_to_torch(variables, num_batches_tracked=nbt)
  assert sorted(back) == sorted(state)
  for key, value in state.items():
    assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
  again = torch_reference.torch_to_flax(back)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), again, variables))
  shapes = lambda t: jax.tree.map(jnp.shape, t)
  assert shapes(variables) == shapes(dict(flax_shapes(config)))


def test_torch_parameter_names_are_torchvision_style():
  model = torch_reference.create_torch_model(model_config('resnet18', 'batch'))
  names = set(model.state_dict())
  assert {'conv1.weight', 'bn1.running_var', 'bn1.num_batches_tracked', 'layer1.0.conv1.weight',
          'layer2.0.downsample.0.weight', 'layer2.0.downsample.1.running_mean', 'fc.weight',
          'fc.bias'} <= names
  assert not any(n.startswith('layer1.0.downsample') for n in names)
  # 11.17 M parameters at full width (blog.md).
  full_config = model_config('resnet18', 'batch')
  full_config.width_multiplier = 1.0
  full = torch_reference.create_torch_model(full_config)
  assert sum(p.numel() for p in full.parameters()) == 11_173_962


def test_zero_init_residual():
  model = torch_reference.create_torch_model(model_config('resnet9', 'group_ws', True))
  for name, value in model.state_dict().items():
    if name.endswith('bn2.weight'):
      assert torch.count_nonzero(value) == 0
    elif name.endswith(('bn1.weight', 'downsample.1.weight')):
      assert torch.all(value == 1)


def data_config(n_train=20, n_eval=12, batch=8, augment=True, drop_remainder=False):
  config = smoke.get_config()
  config.seed = 3
  config.batch_size, config.eval_batch_size = batch, 5
  config.data.synthetic_train_size, config.data.synthetic_eval_size = n_train, n_eval
  config.data.augment, config.data.drop_remainder = augment, drop_remainder
  return config


@pytest.mark.parametrize('augment,drop_remainder', [(True, False), (False, True)])
def test_identical_mode_is_the_jax_batch(augment, drop_remainder):
  config = data_config(augment=augment, drop_remainder=drop_remainder)
  dataset = input_pipeline.load_dataset(config.data, config.seed)
  epoch = 2
  batches = list(torch_reference.torch_batches(dataset, config, epoch, 'identical'))
  assert len(batches) == (2 if drop_remainder else 3)
  _, key = jax.random.split(jax.random.PRNGKey(config.seed))  # train.train_and_evaluate's data key
  perm = input_pipeline.epoch_permutation(key, epoch, dataset.num_train)
  for step, (x, y) in enumerate(batches):
    size = min(8, dataset.num_train - 8 * step)
    want_x, want_y = input_pipeline.get_train_batch(
        dataset.train_images, dataset.train_labels, perm, 8 * step, size,
        input_pipeline.batch_key(key, epoch, step), augment)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (size, 3, 32, 32)
    np.testing.assert_array_equal(x.numpy(), np.asarray(want_x).transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y.numpy(), np.asarray(want_y))


def to_uint8(x):
  """Inverts Normalize(MEAN_RGB, STD_RGB) and ToTensor on an NCHW batch: uint8 NHWC."""
  x = x.numpy().transpose(0, 2, 3, 1)
  x = x * np.float32(input_pipeline.STD_RGB) + np.float32(input_pipeline.MEAN_RGB)
  return np.round(x * 255.0).astype(np.uint8)


def crops_and_flips(image):
  """The 162 images RandomCrop(32, padding=4) + RandomHorizontalFlip can make from `image`."""
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  crops = [padded[i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
  return crops + [c[:, ::-1] for c in crops]


def test_native_mode_shuffles_crops_and_flips():
  config = data_config()
  dataset = input_pipeline.load_dataset(config.data, config.seed)
  batches = list(torch_reference.torch_batches(dataset, config, 0, 'native'))
  assert [len(y) for _, y in batches] == [8, 8, 4]
  assert batches[0][0].dtype == torch.float32 and batches[0][0].shape == (8, 3, 32, 32)
  again = list(torch_reference.torch_batches(dataset, config, 0, 'native'))
  assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
  other = next(torch_reference.torch_batches(dataset, config, 1, 'native'))
  assert not torch.equal(batches[0][0], other[0])

  # The normalisation is the JAX one up to float32 rounding.
  plain = data_config(augment=False)
  xs, ys = zip(*torch_reference.torch_batches(dataset, plain, 0, 'native'))
  x, y = torch.cat(xs), torch.cat(ys).numpy()
  u8 = to_uint8(x)
  want = np.asarray(input_pipeline.normalize(u8)).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(x.numpy(), want, rtol=0, atol=1e-6)
  # Without augmentation an epoch is a permutation of the training set.
  flat = [img.tobytes() for img in dataset.train_images]
  order = [flat.index(img.tobytes()) for img in u8]
  assert sorted(order) == list(range(dataset.num_train))
  np.testing.assert_array_equal(y, dataset.train_labels[order])

  # With it, every image is one of the crop/flip variants of a training image with the same label.
  variants = {v.tobytes(): k for k in range(dataset.num_train)
              for v in crops_and_flips(dataset.train_images[k])}
  for x, y in batches:
    for img, label in zip(to_uint8(x), y.numpy()):
      assert dataset.train_labels[variants[img.tobytes()]] == label


def test_eval_batches_are_unaugmented_in_order():
  config = data_config()
  dataset = input_pipeline.load_dataset(config.data, config.seed)
  xs, ys = zip(*torch_reference.torch_eval_batches(dataset, 5))
  assert [len(y) for y in ys] == [5, 5, 2]
  want = np.asarray(input_pipeline.normalize(dataset.eval_images)).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(torch.cat(xs).numpy(), want, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(torch.cat(ys).numpy(), dataset.eval_labels)


def test_schedulers_build_with_blog_defaults():
  config = smoke.get_config()
  for name in torch_reference.SCHEDULES:
    config.schedule.name = name
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.9)
    scheduler = torch_reference.create_torch_scheduler(optimizer, config.schedule, 10, 7)
    every = torch_reference.schedule_step_every(config.schedule)
    assert every == builders.SCHEDULES[name].step_every
    assert every == ('batch' if name in ('cyclic', 'one_cycle', 'bit_hyperrule', 'warmup_cosine')
                     else 'epoch')
    if name == 'one_cycle':
      assert scheduler.total_steps == 70
    if name == 'cosine':
      assert scheduler.T_max == 10
  config.schedule.name = 'cosine'
  config.schedule.step_every = 'batch'
  config.schedule.warmup_epochs = 2
  optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.9)
  scheduler = torch_reference.create_torch_scheduler(optimizer, config.schedule, 10, 7)
  assert optimizer.param_groups[0]['lr'] == pytest.approx(0.05 / 3)
  assert scheduler._schedulers[1].T_max == 70  # pylint: disable=protected-access


@pytest.mark.parametrize('data_mode', torch_reference.DATA_MODES)
def test_train_and_evaluate_torch_writes_metrics(tmp_path, data_mode):
  config = smoke.get_config()
  config.num_epochs = 1
  config.batch_size, config.eval_batch_size = 16, 32
  config.data.synthetic_train_size, config.data.synthetic_eval_size = 40, 24
  model, last = torch_reference.train_and_evaluate_torch(config, str(tmp_path), data_mode, 'cpu')
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert len(lines) == 1 and lines[0] == last
  assert set(last) == {'epoch', 'step', 'train_loss', 'train_accuracy', 'eval_loss', 'eval_accuracy',
                       'learning_rate', 'momentum', 'images_per_second', 'elapsed_seconds'}
  assert last['step'] == 3 and last['learning_rate'] == config.optimizer.lr
  assert 0.0 <= last['train_accuracy'] <= 1.0 and 0.0 <= last['eval_accuracy'] <= 1.0
  assert np.isfinite(last['train_loss']) and np.isfinite(last['eval_loss'])
  assert isinstance(model, torch_reference.TorchResNet)


def test_importing_torch_reference_does_not_import_torch():
  code = 'import sys, cifar_jax.torch_reference; assert "torch" not in sys.modules'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-c', code], check=True, cwd=root, env=env)


SCHEDULE_CASES = {
    'multistep': {'milestones': (3, 6)},
    'step': {'step_size': 3},
    'cosine': {},
    'cosine_per_batch_warmup': {'name': 'cosine', 'step_every': 'batch', 'warmup_epochs': 2},
    'warm_restarts': {'T_0': 3, 'T_mult': 2, 'eta_min': 0.001},
    'warm_restarts_fractional': {'name': 'warm_restarts', 'T_0': 3, 'fractional': True},
    'cyclic': {'step_size_up': 5, 'step_size_down': 3, 'mode': 'triangular2'},
    'one_cycle': {},
    'one_cycle_three_phase_linear': {'name': 'one_cycle', 'three_phase': True,
                                     'anneal_strategy': 'linear'},
    'constant': {},
}


@pytest.mark.parametrize('case', sorted(SCHEDULE_CASES))
def test_torch_schedulers_match_the_jax_schedules(case):
  """torch's lr (and momentum) at every optimizer step equals the JAX trainer's, cast to float32."""


  config = smoke.get_config()
  config.num_epochs, spe = 10, 7
  config.schedule.name = case
  config.schedule.update(SCHEDULE_CASES[case])
  lrs, momenta = torch_reference.torch_schedule_table(config, spe)
  lr_fn, momentum_fn = builders.create_schedules(config, spe)
  num_steps = config.num_epochs * spe
  np.testing.assert_array_equal(lrs.astype(np.float32), lr_fn.table(num_steps))
  if momentum_fn is None:
    assert np.all(momenta == config.optimizer.momentum)
  else:
    np.testing.assert_array_equal(momenta.astype(np.float32), momentum_fn.table(num_steps))


# 20 steps: each framework rounds its float32 updates its own way (torch's FMA vs XLA's fusion,
# torch_semantics.md section 4), and the differences compound; measured: losses within 1.4e-6 relative
# at every step, params within 1e-5 relative of their tensor's largest value (BN biases near 0 aside).
TRAJECTORY_RTOL = 1e-4


def _twin(config):
  """The data, the torch model (seed 0), its weights as Flax variables, and its optimizer."""
  dataset = input_pipeline.load_dataset(config.data, config.seed)
  torch.manual_seed(0)
  model = torch_reference.create_torch_model(config.model)
  variables = torch_reference.torch_to_flax(model.state_dict())
  optimizer = torch_reference.create_torch_optimizer(model.parameters(), config.optimizer)
  return dataset, model, variables, optimizer


def test_jax_train_steps_follow_torch_identical_mode():
  """20 steps of the trainer's jitted step, same initial weights and 'identical' batches, one-cycle lr
  and momentum changing every step: loss at every step, params and BN statistics at the end."""


  config = smoke.get_config()
  config.num_epochs, config.batch_size = 4, 8
  config.model.width_multiplier = WIDTH
  config.data.synthetic_train_size, config.data.synthetic_eval_size = 36, 8  # 5 steps, the last of 4
  config.schedule.name = 'one_cycle'  # lr and momentum change every step
  dataset, model, variables, optimizer = _twin(config)
  n, spe = dataset.num_train, 5
  scheduler = torch_reference.create_torch_scheduler(optimizer, config.schedule, config.num_epochs, spe)
  after_batch, after_epoch = torch_reference.scheduler_hooks(scheduler, config.schedule, spe)

  lr_fn, momentum_fn = builders.create_schedules(config, spe)
  state = builders.create_train_state(jax.random.key(0), config, builders.create_model(config.model),
                                      lr_fn, momentum_fn)
  state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'])
  data_key = torch_reference.jax_data_key(config.seed)
  step_fn = functools.partial(steps.train_step_on_device_data, steps_per_epoch=spe,
                              batch_size=config.batch_size, augment=True)
  jitted = {size: jax.jit(functools.partial(step_fn, size=size)) for size in (8, 4)}
  taken = 0
  for epoch in range(config.num_epochs):
    perm = input_pipeline.epoch_permutation(data_key, epoch, n)
    batches = torch_reference.torch_batches(dataset, config, epoch, 'identical')
    for i, (x, y) in enumerate(batches):
      size = min(config.batch_size, n - i * config.batch_size)
      acc = steps.init_train_metrics()
      state, acc = jitted[size](state, acc, dataset.train_images, dataset.train_labels, perm, data_key)
      model.train()
      loss = torch.nn.functional.cross_entropy(model(x), y)
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      after_batch(epoch, i)
      assert rel_err(float(acc['loss_sum']) / size, loss.item()) < TRAJECTORY_RTOL
      taken += 1
    after_epoch(None)
  assert taken == 20
  want = torch_reference.torch_to_flax(model.state_dict())
  # Per element: relative 1e-4, plus 1e-5 absolute for tensors that stay near zero (BN biases start at 0,
  # and a tensor of size 1e-3 makes any relative measure of its rounding noise large).
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=TRAJECTORY_RTOL, atol=1e-5),
               (state.params, state.batch_stats), (want['params'], want['batch_stats']))


def test_mixup_steps_follow_the_torch_twins_identical_mode():
  """BiT's mixup (data.mixup): the trainer's jitted steps and the twin's `train_epoch` on its 'identical'
  batches (the same lam and partners, `steps.mixup`), one epoch of 5 steps: mean loss, params, statistics."""
  config = smoke.get_config()
  config.num_epochs, config.batch_size = 1, 8
  config.model.width_multiplier = WIDTH
  config.data.synthetic_train_size, config.data.synthetic_eval_size = 36, 8
  config.data.mixup = 0.5
  dataset, model, variables, optimizer = _twin(config)
  n, spe = dataset.num_train, 5
  batches = list(torch_reference.torch_batches(dataset, config, 0, 'identical', mixup_alpha=0.5))
  lams = [b[3] for b in batches]
  assert all(len(b) == 4 for b in batches) and all(0 < lam < 1 for lam in lams) and len(set(lams)) == 5
  record = torch_reference.train_epoch(model, optimizer, batches, 'cpu')

  lr_fn, momentum_fn = builders.create_schedules(config, spe)
  state = builders.create_train_state(jax.random.key(0), config, builders.create_model(config.model),
                                      lr_fn, momentum_fn)
  state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'])
  data_key = torch_reference.jax_data_key(config.seed)
  perm = input_pipeline.epoch_permutation(data_key, 0, n)
  acc = steps.init_train_metrics()
  for size in (8, 8, 8, 8, 4):
    step = jax.jit(functools.partial(steps.train_step_on_device_data, steps_per_epoch=spe, batch_size=8,
                                     size=size, augment=True, mixup_alpha=0.5))
    state, acc = step(state, acc, dataset.train_images, dataset.train_labels, perm, data_key)
  assert rel_err(float(acc['loss_sum'] / acc['count']), record['train_loss']) < TRAJECTORY_RTOL
  want = torch_reference.torch_to_flax(model.state_dict())
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=TRAJECTORY_RTOL, atol=1e-5),
               (state.params, state.batch_stats), (want['params'], want['batch_stats']))
  # and it mixed: the same epoch without mixup ends elsewhere
  plain = jax.jit(functools.partial(steps.train_step_on_device_data, steps_per_epoch=spe, batch_size=8,
                                    size=8, augment=True))
  start = state.replace(params=variables['params'], batch_stats=variables['batch_stats'], step=0)
  unmixed, _ = plain(start, steps.init_train_metrics(), dataset.train_images, dataset.train_labels, perm,
                     data_key)
  mixed, _ = jax.jit(functools.partial(steps.train_step_on_device_data, steps_per_epoch=spe, batch_size=8,
                                       size=8, augment=True, mixup_alpha=0.5))(
      start, steps.init_train_metrics(), dataset.train_images, dataset.train_labels, perm, data_key)
  assert not np.allclose(np.asarray(mixed.params['fc']['kernel']), np.asarray(unmixed.params['fc']['kernel']))
