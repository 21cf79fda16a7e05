"""cifar_jax/cpu_backend.py: how many virtual CPU devices a run gets, and the flags reaching XLA."""

import json
import os
import subprocess
import sys

from cifar_jax import cpu_backend
from cifar_jax import onednn_conv
from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(conv='xla', **fields):
  config = default.get_config()
  config.model.conv = conv
  for name, value in fields.items():
    setattr(config, name, value)
  return config


def test_auto_device_count_is_one_per_core_when_the_batch_divides():
  assert default.get_config().cpu_devices == 0  # auto
  assert cpu_backend.auto_device_count(_config(batch_size=128), cores=2) == 2
  assert cpu_backend.auto_device_count(_config(batch_size=6), cores=4) == 3  # the largest divisor
  assert cpu_backend.auto_device_count(_config(batch_size=127), cores=2) == 1
  assert cpu_backend.auto_device_count(_config(batch_size=128), cores=1) == 1


def test_auto_device_count_keeps_one_device_for_pmap_processes_and_seeds():
  assert cpu_backend.auto_device_count(_config(parallelism='pmap'), cores=2) == 1
  assert cpu_backend.auto_device_count(_config(num_seeds=3), cores=2) == 1
  config = _config()
  config.distributed.num_processes = 2
  assert cpu_backend.auto_device_count(config, cores=2) == 1


def test_auto_device_count_keeps_one_device_for_onednn_convolutions():
  # oneDNN spreads each convolution over every core itself; auto uses it where it builds.
  assert cpu_backend.auto_device_count(_config(conv='onednn'), cores=2) == 1
  buildable = onednn_conv.missing_build_requirement() is None
  assert cpu_backend.auto_device_count(_config(conv='auto'), cores=2) == (1 if buildable else 2)


def test_an_explicit_count_wins():
  assert cpu_backend.auto_device_count(_config(cpu_devices=3, parallelism='pmap'), cores=2) == 3
  assert cpu_backend.auto_device_count(_config(cpu_devices=1), cores=8) == 1


PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
from cifar_jax import cpu_backend
from cifar_jax import onednn_conv
from configs import default
config = default.get_config()
config.cpu_devices = {count}
added = cpu_backend.configure(config)
import jax
jax.numpy.zeros(1).block_until_ready()
print(json.dumps({{'added': added, 'devices': jax.device_count(), 'flags': os.environ.get('XLA_FLAGS', ''),
                   'again': cpu_backend.configure(config)}}))
"""


def _probe(count: int, xla_flags: str | None):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  if xla_flags is not None:
    env['XLA_FLAGS'] = xla_flags
  proc = subprocess.run([sys.executable, '-c', PROBE.format(root=ROOT, count=count)], env=env,
                        capture_output=True, text=True, timeout=120, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_configure_sets_the_flags_before_jax_starts_and_not_after():
  out = _probe(3, None)
  assert out['devices'] == 3
  assert out['added'] == [cpu_backend.EIGEN_CONVOLUTIONS, f'{cpu_backend.DEVICE_COUNT_FLAG}=3']
  assert out['again'] == []  # JAX has started: nothing more is added


def test_one_device_when_asked():
  out = _probe(1, None)
  assert out['devices'] == 1 and out['added'] == [cpu_backend.EIGEN_CONVOLUTIONS]


def test_configure_leaves_the_users_xla_flags_alone():
  out = _probe(3, f'{cpu_backend.DEVICE_COUNT_FLAG}=1 {cpu_backend.YNN_FLAG}=')
  assert out['devices'] == 1 and out['added'] == []


def test_gpu_run_reads_jax_platforms_then_the_machine(monkeypatch):
  for platforms, gpu in (('cuda', True), ('gpu', True), ('rocm', True), ('cuda,cpu', True),
                         ('cpu', False), ('cpu,cuda', False), ('tpu', False)):
    monkeypatch.setenv('JAX_PLATFORMS', platforms)
    assert cpu_backend.gpu_run() is gpu, platforms
  monkeypatch.delenv('JAX_PLATFORMS')
  for plugins, listed, gpu in ((['xla_cuda12'], True, True), (['xla_cuda12'], False, False),
                               ([], True, False)):
    monkeypatch.setattr(cpu_backend, '_gpu_plugins', lambda plugins=plugins: plugins)
    monkeypatch.setattr(cpu_backend, '_gpu_listed', lambda listed=listed: listed)
    assert cpu_backend.gpu_run() is gpu, (plugins, listed)


def test_configure_adds_nothing_on_a_gpu(monkeypatch):
  monkeypatch.setattr(cpu_backend, 'backend_started', lambda: False)  # as before JAX starts
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert cpu_backend.configure(_config(cpu_devices=16)) == []
  assert os.environ['XLA_FLAGS'] == ''
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert cpu_backend.configure(_config(cpu_devices=16)) == [cpu_backend.EIGEN_CONVOLUTIONS,
                                                            f'{cpu_backend.DEVICE_COUNT_FLAG}=16']


def test_the_sequential_scheduler_for_the_pretrained_families_and_bfloat16(monkeypatch):
  monkeypatch.setattr(cpu_backend, 'backend_started', lambda: False)
  monkeypatch.setattr(cpu_backend, 'gpu_run', lambda: False)
  config = default.get_config()
  for name, sequential in [('resnet18', False), ('efficientnet_lite0', True), ('torchvision_resnet50', True)]:
    config.model.name = name
    monkeypatch.setenv('XLA_FLAGS', '')
    assert (cpu_backend.SEQUENTIAL_SCHEDULER in cpu_backend.configure(config)) == sequential, name
  config.model.name, config.model.dtype = 'resnet18', 'bfloat16'
  monkeypatch.setenv('XLA_FLAGS', '')
  assert cpu_backend.SEQUENTIAL_SCHEDULER in cpu_backend.configure(config)
  monkeypatch.setenv('XLA_FLAGS', f'{cpu_backend.SCHEDULER_FLAG}=true')  # the user's choice stays
  assert cpu_backend.SEQUENTIAL_SCHEDULER not in cpu_backend.configure(config)
