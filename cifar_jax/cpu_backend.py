"""XLA:CPU settings that make the CPU train step fast; they must be set before JAX starts its backend.

Measured on a 2-core Sapphire Rapids VM (BENCHMARKS.md, "JAX vs PyTorch on the CPU"):
- Convolutions go to oneDNN (`cifar_jax/onednn_conv.py`, `config.model.conv='auto'`) where it builds;
  then the run keeps one CPU device, since every oneDNN call spreads over all the cores itself.
- XLA:CPU hands its own convolutions (`model.conv='xla'`, or where oneDNN is missing) to YNNPACK by
  default; its weight-gradient convolution is 2.4-4.3x slower than XLA's Eigen path (a 16-channel 3x3
  layer at 32x32, batch 128: 24.7 vs 10.1 ms), so convolutions go back to Eigen
  (`-individual_convolution`); YNNPACK keeps dots and the rest.
- With XLA's convolutions, one virtual CPU device per core (`config.cpu_devices = 0`, the default), the
  batch sharded over them (`parallelism='jit'`): 1.06x at ResNet18 width 0.25; at width 1 within the
  noise (two runs: 0.94x and 1.12x).

`cifar-jax` calls `configure` before anything touches a device; in a notebook, call it before the first
JAX computation. Settings already in XLA_FLAGS are left as they are, and a run on a GPU (`gpu_run`) gets
none: its backend is not XLA:CPU, and a run whose GPU fails to start should not become a tuned CPU run.
"""

import importlib.metadata
import os
import subprocess

from absl import logging

from cifar_jax import models
from cifar_jax import onednn_conv

try:
  from jax._src import xla_bridge
except ImportError:  # a JAX that moved it: `backend_started` then assumes the flags still count
  xla_bridge = None

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
EIGEN_CONVOLUTIONS = f'{YNN_FLAG}=-individual_convolution'
DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler'
SEQUENTIAL_SCHEDULER = f'{SCHEDULER_FLAG}=false'
GPU_PLATFORMS = ('cuda', 'gpu', 'rocm')


def _gpu_plugins() -> list[str]:
  """The JAX GPU plugins installed (entry points such as xla_cuda12), read without importing them."""
  try:
    names = [e.name for e in importlib.metadata.entry_points(group='jax_plugins')]
  except Exception:  # pylint: disable=broad-except
    return []
  return [n for n in names if any(p in n for p in ('cuda', 'rocm'))]


def _gpu_listed() -> bool:
  """Whether `nvidia-smi -L` lists a GPU (or, for ROCm, /dev/kfd exists)."""
  if os.path.exists('/dev/kfd'):
    return True
  if os.environ.get('CUDA_VISIBLE_DEVICES', None) in ('', '-1'):
    return False
  try:
    proc = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return False
  return proc.returncode == 0 and 'GPU' in proc.stdout


def gpu_run() -> bool:
  """Whether JAX will start on a GPU, judged without starting it (XLA_FLAGS are read when it starts).

  JAX_PLATFORMS set: whether its first platform is cuda, gpu or rocm. Unset: whether a JAX GPU plugin
  is installed and `nvidia-smi -L` lists a GPU (ROCm: /dev/kfd exists).
  """
  platforms = os.environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    return platforms.split(',')[0].strip() in GPU_PLATFORMS
  return bool(_gpu_plugins()) and _gpu_listed()


def backend_started() -> bool:
  """Whether JAX has already created its backends (XLA_FLAGS are read then, and only then)."""
  started = getattr(xla_bridge, 'backends_are_initialized', None)
  return bool(started and started())  # a JAX without this function: assume the flags still count


def auto_device_count(config, cores: int | None = None) -> int:
  """Virtual CPU devices for `config`: `config.cpu_devices`, or (0) one per core where that is safe.

  Auto keeps one device for pmap, for multi-process runs (their processes share the host's cores), for
  several seeds in one run (their CPU throughput in BENCHMARKS.md is measured on one device; set
  cpu_devices to split them), for oneDNN's convolutions (`uses_onednn`) and when the batch does not
  split; otherwise it takes the largest count up to the cores that divides `batch_size` (and each
  micro-batch, `optimizer.micro_batches`).
  """
  if config.get('cpu_devices', 0) > 0:
    return config.cpu_devices
  cores = cores or os.cpu_count() or 1
  processes = (config.distributed.num_processes or int(os.environ.get('JAX_NUM_PROCESSES') or 0)
               or int(os.environ.get('SLURM_NTASKS') or 0))  # srun --ntasks=N: N processes (parallel.py)
  if (config.get('parallelism', 'jit') != 'jit' or processes > 1 or config.get('num_seeds', 1) > 1):
    return 1
  if uses_onednn(config):
    return 1
  count = cores
  micro_batch = config.batch_size // max(config.optimizer.get('micro_batches', 1), 1)
  while count > 1 and (config.batch_size % count or micro_batch % count):
    count -= 1
  return count


def uses_onednn(config) -> bool:
  """Whether `config.model.conv` will pick oneDNN's convolutions (one device; oneDNN uses every core)."""
  choice = config.model.get('conv', 'auto')
  return choice == 'onednn' or (choice == 'auto' and onednn_conv.missing_build_requirement() is None)


def sequential_scheduler(config) -> bool:
  """Whether `config` runs best under XLA:CPU's memory-minimising scheduler instead of its default,
  concurrency-optimised one (which orders the step so that independent ops may run at once): a pretrained
  family (ImageNet-sized activations, `models.PRETRAINED_FAMILIES`) or bfloat16 compute.

  EfficientNet-Lite0 at 128 px, batch 128 plans 2.83 against 3.41 GB of temporaries in float32 (1.70
  against 2.28 in bfloat16), its step 0.55 GB lower at its peak at the same speed (1.01x, 0.96x); the
  blog's ResNet18 at width 0.25 ran 1.05x as fast in bfloat16 but 0.96x in float32, where its small ops gain
  from running side by side, so float32 ResNets keep the default (BENCHMARKS.md, "XLA:CPU's scheduler").
  """
  return config.model.name in models.PRETRAINED_FAMILIES or config.model.get('dtype') == 'bfloat16'


def configure(config) -> list[str]:
  """Adds the fast XLA:CPU settings for `config` to XLA_FLAGS; returns the flags it added (none on a GPU)."""
  if gpu_run():
    return []
  if backend_started():
    logging.warning('JAX started before cpu_backend.configure: XLA:CPU keeps its current settings.')
    return []
  current = os.environ.get('XLA_FLAGS', '')
  added = []
  if YNN_FLAG not in current:
    added.append(EIGEN_CONVOLUTIONS)
  count = auto_device_count(config)
  if DEVICE_COUNT_FLAG not in current and count > 1:
    added.append(f'{DEVICE_COUNT_FLAG}={count}')
  if SCHEDULER_FLAG not in current and sequential_scheduler(config):
    added.append(SEQUENTIAL_SCHEDULER)
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([current] + added).strip()
  return added
