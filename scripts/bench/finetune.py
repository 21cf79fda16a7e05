"""Fine-tuning throughput and peak memory, JAX vs torch: EfficientNet-Lite0 (or a torchvision ResNet)
training steps on CIFAR-size images resized on the device, full fine-tune or linear probe.

  JAX_PLATFORMS=cpu python scripts/benchmark.py finetune --model=efficientnet_lite0 --image_size=64 --batch=50

Variants (`VARIANTS`: a name and the function that builds its step), each in its own worker process:
  jax            the trainer's jitted `steps.train_step` with `builders.create_optimizer` (the config's stage
                 groups), the model's convolutions as `cifar-jax` picks them (`builders.conv_impl`: oneDNN on
                 one CPU device, depthwise ones included); with --micro_batches > 1 the trainer's
                 `steps.train_step_micro_batches`
  jax_bf16       the same with model.dtype=bfloat16 (mixed precision)
  jax_xla_batch_norm, jax_onednn_batch_norm (and jax_bf16_...)   the same with model.batch_norm set to
                 XLA's or oneDNN's training-mode BatchNorm instead of what 'auto' picks
  torch          the torch twin (`torch_models.finetune`: the package's / torchvision-named model behind the
                 same input transform, the same param groups), eager, NCHW
  torch_cl       the same in torch.channels_last
  torch_autocast, torch_cl_autocast   the two under torch.autocast('cpu', torch.bfloat16)
A window is --warmup untimed steps (the first window's include the compile) then --steps timed ones; the
variants take turns window by window. With --windows=1 (the default) that is the measurement
scripts/bench_finetune.py made: each variant warmed up, then --steps steps timed, one after the other.
Reports images/s of wall time, images per CPU-second of the worker (the second is steadier on a shared
machine: other jobs' load slows the first), medians over the windows, and each worker's peak resident set
(ru_maxrss: the torch worker's includes JAX, which the torch twin imports; the JAX worker does not import
torch), with the step's own share: the peak less the resident set before the first step (model, state
and batch built), which leaves the imports of either framework out.

To add a variant, add an entry to VARIANTS: a function (args, images, labels) -> (one_step, label) where
one_step() runs one training step to completion and label names the row (None: the variant's name).
"""

import functools
import os
import time

import numpy as np

from bench import harness


def add_flags(parser) -> None:
  parser.add_argument('--model', default='efficientnet_lite0')
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--batch', type=int, default=50)
  parser.add_argument('--steps', type=int, default=5, help='timed steps a window')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps at the start of every window')
  parser.add_argument('--windows', type=int, default=1, help='timed windows per variant, taking turns')
  parser.add_argument('--probe', action='store_true', help='linear probe (frozen backbone and BatchNorm)')
  parser.add_argument('--micro_batches', type=int, default=1,
                      help='jax variants: optimizer.micro_batches (gradient accumulation in the step)')
  parser.add_argument('--variants', default='jax,torch,torch_cl', help='comma-separated names of VARIANTS')
  parser.add_argument('--json', default='')


def _config(args, dtype: str = 'float32'):
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.model.name = args.model
  config.model.dtype = dtype
  config.model.image_size = args.image_size
  config.optimizer.lr = 0.01
  if args.probe:
    config.finetune.frozen = 'backbone'
    config.model.frozen_bn = True
  return config


def _pointwise_as_dots() -> None:
  """Routes 1x1 stride-1 ungrouped convolutions to XLA's dot (`lax.dot_general`) instead of oneDNN, in
  this worker only: the measurement behind keeping them in oneDNN (BENCHMARKS.md, Lite0's section)."""
  from jax import lax  # pylint: disable=g-import-not-at-top

  from cifar_jax import onednn_conv  # pylint: disable=g-import-not-at-top
  inner = onednn_conv.conv_general_dilated

  def conv(lhs, rhs, window_strides, padding, *args, feature_group_count=1, **kwargs):
    unpadded = isinstance(padding, str) or all(tuple(p) == (0, 0) for p in padding)
    if rhs.shape[:2] == (1, 1) and tuple(window_strides) == (1, 1) and feature_group_count == 1 and unpadded:
      return lax.dot_general(lhs, rhs[0, 0], (((3,), (0,)), ((), ())))
    return inner(lhs, rhs, window_strides, padding, *args, feature_group_count=feature_group_count, **kwargs)

  onednn_conv.conv_general_dilated = conv


def jax_step(args, images, labels, dtype: str = 'float32', scheduler: str = '', pointwise_dots: bool = False,
             batch_norm: str = ''):
  """The trainer's jitted train step (state donated) on one fixed batch, with cifar-jax's XLA:CPU flags."""
  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top
  if pointwise_dots:
    _pointwise_as_dots()

  config = _config(args, dtype)
  if batch_norm:  # config.model.batch_norm: 'xla' or 'onednn' instead of what 'auto' picks
    config.model.batch_norm = batch_norm
  if scheduler:  # XLA:CPU's scheduler: 'true' its concurrency-optimised default, 'false' the sequential one
    flag = f'{cpu_backend.SCHEDULER_FLAG}={scheduler}'
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  cpu_backend.configure(config)  # the XLA:CPU settings cifar-jax uses, before JAX starts
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from cifar_jax import builders  # pylint: disable=g-import-not-at-top
  from cifar_jax import steps  # pylint: disable=g-import-not-at-top

  model = builders.create_model(config.model)
  params, batch_stats = builders.initialized(jax.random.PRNGKey(0), model)
  state = steps.TrainState.create(apply_fn=model.apply, params=params, batch_stats=batch_stats,
                                  tx=builders.create_optimizer(config, config.optimizer.lr))
  if args.micro_batches > 1:
    step = jax.jit(functools.partial(steps.train_step_micro_batches, micro_batches=args.micro_batches),
                   donate_argnums=0)
  else:
    step = jax.jit(steps.train_step, donate_argnums=0)
  batch = (jnp.asarray(images), jnp.asarray(labels))
  rngs = {'shake': jax.random.PRNGKey(1)}
  holder = [state]

  def one():
    holder[0], metrics = step(holder[0], batch, rngs=rngs)
    jax.block_until_ready(metrics)

  micro = f', {args.micro_batches} micro-batches' if args.micro_batches > 1 else ''
  sched = {'true': ", XLA's concurrent scheduler", 'false': ", XLA's sequential scheduler"}.get(scheduler, '')
  dots = ', 1x1 as XLA dots' if pointwise_dots else ''
  return one, f'jax {dtype} ({model.conv_impl} convolutions, {model.bn_impl} BatchNorm{dots}{micro}{sched})'


def torch_step(args, images, labels, channels_last: bool = False, autocast: bool = False):
  """The torch twin's eager train step (SGD with the same param groups) on one fixed batch."""
  import torch  # pylint: disable=g-import-not-at-top

  from cifar_jax.torch_models import finetune  # pylint: disable=g-import-not-at-top

  config = _config(args)
  torch.manual_seed(0)
  model = finetune.create_model(config.model, 10)
  optimizer = finetune.create_optimizer(model, config)
  finetune.set_train_mode(model, config.model.frozen_bn)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(labels).long()
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)

  def one():
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
      loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

  layout = 'channels_last' if channels_last else 'eager NCHW'
  return one, f'torch {"autocast bfloat16" if autocast else "float32"} ({layout})'


VARIANTS = {
    'jax': jax_step,
    'jax_bf16': functools.partial(jax_step, dtype='bfloat16'),
    'jax_pointwise_dots': functools.partial(jax_step, pointwise_dots=True),
    'jax_bf16_pointwise_dots': functools.partial(jax_step, dtype='bfloat16', pointwise_dots=True),
    'jax_xla_batch_norm': functools.partial(jax_step, batch_norm='xla'),
    'jax_bf16_xla_batch_norm': functools.partial(jax_step, dtype='bfloat16', batch_norm='xla'),
    'jax_onednn_batch_norm': functools.partial(jax_step, batch_norm='onednn'),
    'jax_bf16_onednn_batch_norm': functools.partial(jax_step, dtype='bfloat16', batch_norm='onednn'),
    'jax_concurrent_scheduler': functools.partial(jax_step, scheduler='true'),
    'jax_bf16_concurrent_scheduler': functools.partial(jax_step, dtype='bfloat16', scheduler='true'),
    'torch': torch_step,
    'torch_cl': functools.partial(torch_step, channels_last=True),
    'torch_autocast': functools.partial(torch_step, autocast=True),
    'torch_cl_autocast': functools.partial(torch_step, channels_last=True, autocast=True),
}


def _batch(args):
  rng = np.random.RandomState(0)
  images = rng.randn(args.batch, 32, 32, 3).astype(np.float32)
  labels = rng.randint(0, 10, args.batch).astype(np.int32)
  return images, labels


def _timed(step, n: int) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of n calls of step()."""
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(n):
    step()
  return time.perf_counter() - wall, time.process_time() - cpu


def worker(args) -> None:
  one, label = VARIANTS[args.worker](args, *_batch(args))

  def window():
    for _ in range(args.warmup):
      one()
    wall, cpu = _timed(one, args.steps)
    return {'wall': wall, 'cpu': cpu}

  harness.serve({'label': label or args.worker, 'baseline_rss_mb': harness.peak_rss_mb()}, {'train': window})


def _variants(args) -> list[str]:
  names = [v for v in args.variants.split(',') if v]
  bad = [v for v in names if v not in VARIANTS]
  if bad or not names:
    raise harness.UsageError(f'--variants: unknown {bad}; choose from {list(VARIANTS)}')
  return names


def main(args) -> None:
  names = _variants(args)
  flags = [f'--model={args.model}', f'--image_size={args.image_size}', f'--batch={args.batch}',
           f'--steps={args.steps}', f'--warmup={args.warmup}', f'--micro_batches={args.micro_batches}'
           ] + (['--probe'] if args.probe else [])
  n = args.steps * args.batch
  with harness.workers({v: harness.worker_command('finetune', v, flags) for v in names}) as procs:

    def on_window(index, times):
      for v in names:
        t = times[v][-1]
        print(f'{procs[v].ready["label"]:32s} {n / t["wall"]:8.1f} images/s  {n / t["cpu"]:8.1f} images per '
              f'CPU-second (window {index + 1})', flush=True)

    times = harness.alternate(names, args.windows, lambda v: procs[v].ask('train'), on_window=on_window)
    memory = {v: procs[v].finish() for v in names}
    labels = {v: procs[v].ready['label'] for v in names}
    baselines = {v: procs[v].ready['baseline_rss_mb'] for v in names}
  rows = []
  for v in names:
    wall = harness.median(t['wall'] for t in times[v])
    cpu = harness.median(t['cpu'] for t in times[v])
    rows.append({'variant': labels[v], 'images_per_second': n / wall, 'images_per_cpu_second': n / cpu,
                 'peak_rss_mb': memory[v]['peak_rss_mb'], 'baseline_rss_mb': baselines[v],
                 'step_rss_mb': memory[v]['peak_rss_mb'] - baselines[v],
                 'windows_images_per_second': [n / t['wall'] for t in times[v]]})
  what = 'linear probe' if args.probe else 'full'
  fp = harness.fingerprint()
  print(f'\n{args.model} at {args.image_size} px, batch {args.batch}, {what}; {args.steps} steps x '
        f'{args.windows} window(s), medians; {harness.describe(fp)}\n')
  print(harness.markdown_table(
      ['variant', 'images/s', 'images per CPU-second', 'peak RSS (MiB)', 'before the first step (MiB)',
       'the step: peak less before (MiB)'],
      [[r['variant'], r['images_per_second'], r['images_per_cpu_second'], r['peak_rss_mb'],
        r['baseline_rss_mb'], r['step_rss_mb']] for r in rows]))
  harness.write_json(args.json, {'args': harness.flag_values(args), 'rows': rows, 'fingerprint': fp})
