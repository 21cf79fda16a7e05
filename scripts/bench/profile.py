"""Where a ResNet18 train step's time goes: XLA's ops (--mode=xla) or oneDNN's calls (--mode=onednn).

  JAX_PLATFORMS=cpu taskset -c 0 python scripts/benchmark.py profile --width=0.25 [--torch]
  JAX_PLATFORMS=cpu python scripts/benchmark.py profile --mode=onednn --width=0.25 --dtype=bfloat16 --steps=3

--mode=xla: the loss gradient of the model (BatchNorm in training mode), jitted, with cifar-jax's XLA:CPU
settings (cifar_jax/cpu_backend.py, one device), traced by jax.profiler over --steps calls; prints the time
per step of each kind of XLA op (convolution, transpose_copy_fusion, ...) and their sum. torch (with
--torch): the reference model's full train step under torch.profiler, --torch_threads threads, ms per
step and the top ops. Pin to one core (taskset) to compare with one torch thread.

--mode=onednn: the trainer's oneDNN custom call (JAX, the `onednn-cpu-gomp` wheel's oneDNN) against torch's
own bundled oneDNN, by ONEDNN_VERBOSE's `exec` lines summed per primitive kind, direction and
implementation. Each framework runs in a worker process with ONEDNN_VERBOSE=1: two untimed steps, then
--steps steps between markers; the table is milliseconds per step (oneDNN's own timing of each call). The
steps are the xla mode's: JAX's jitted loss gradient with the trainer's CPU settings; torch's train step
(forward and loss under autocast for bfloat16, backward, SGD), 2 threads. Calls outside oneDNN (XLA's
fusions, torch's elementwise kernels and optimizer) are not in it.

--steps_per_call=N (both modes): JAX runs N gradient steps in one call, as the trainer does (up to 8); with
one step a call, XLA:CPU maps a call's temporary buffers afresh and the kernel zero-fills each page on its
first touch, which lands in the forward ops (oneDNN's forward convolutions and BatchNorm among them).
"""

import collections
import glob
import gzip
import json
import os
import re
import subprocess
import tempfile
import time

from bench import harness

MODES = ('xla', 'onednn')
PRETRAINED_FAMILIES = ('efficientnet_lite0', 'torchvision_resnet18', 'torchvision_resnet34',
                       'torchvision_resnet50')
# A depthwise convolution in ONEDNN_VERBOSE's problem description: as many groups as channels in and out.
DEPTHWISE = re.compile(r'g(\d+)mb\d+_ic\1oc\1_')
START, END = '=== profile start', '=== profile end'
ONEDNN_TORCH_THREADS = 2


def add_flags(parser) -> None:
  parser.add_argument('--mode', default='xla', choices=MODES, help="xla: XLA's ops; onednn: oneDNN's calls")
  parser.add_argument('--model', default='resnet18', help='resnet18 | resnet9 | efficientnet_lite0 | ...')
  parser.add_argument('--image_size', type=int, default=0,
                      help='the pretrained families (efficientnet_lite0, torchvision_*): the size the batch '
                           'is resized to on the device (model.image_size; 0: 32 px)')
  parser.add_argument('--width', type=float, default=0.25)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--seeds', type=int, default=1, help='xla: k models in one vmap-ed step')
  parser.add_argument('--top', type=int, default=15, help='xla: rows of each table')
  parser.add_argument('--conv', default='auto', help='config.model.conv: auto | xla | onednn')
  parser.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'),
                      help='model.dtype (torch: autocast(bfloat16)); default: float32 (xla), bfloat16 '
                           '(onednn)')
  parser.add_argument('--torch', action='store_true', help='xla: also profile the torch reference')
  parser.add_argument('--torch_threads', type=int, default=1, help='xla: torch threads')
  parser.add_argument('--channels_last', action='store_true', help='onednn: torch in channels_last')
  parser.add_argument('--steps_per_call', type=int, default=1,
                      help='JAX: gradient steps in one jitted call (a fori_loop, each step applying its '
                           'gradient, as the trainer runs up to 8 a call); every figure is per step. With 1, '
                           "each call's first touch of XLA's freshly mapped buffers is in its forward ops")


def jax_gradient_step(args):
  """A zero-argument function running one jitted loss gradient of --model (BatchNorm in training mode)
  on a fixed random batch, with cifar-jax's XLA:CPU settings (one device), and the model."""
  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.cpu_devices = 1
  config.model.conv = getattr(args, 'conv', 'auto')
  cpu_backend.configure(config)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cifar_jax import builders  # pylint: disable=g-import-not-at-top
  from cifar_jax import models  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((args.batch, 32, 32, 3), np.float32))
  y = jnp.asarray(rng.integers(0, 10, args.batch))
  if args.model in PRETRAINED_FAMILIES:  # as the fine-tuning configs build them
    config.model.name, config.model.dtype = args.model, args.dtype
    config.model.image_size = getattr(args, 'image_size', 0)
    model = builders.create_model(config.model)
    params, batch_stats = builders.initialized(jax.random.key(0), model)
    variables = {'params': params, 'batch_stats': batch_stats}
  else:
    conv = builders.conv_impl(config.model)
    model = models.create_model(args.model, width_multiplier=args.width, dtype=builders.DTYPES[args.dtype],
                                conv_impl=conv, bn_impl=builders.bn_impl(config.model, conv))
    variables = model.init(jax.random.key(0), x[:2])
  rngs = {'shake': jax.random.key(1)}  # EfficientNet's dropout and drop-connect (the ResNets draw none)

  def loss(params, batch_stats, x):
    logits, new = model.apply({'params': params, 'batch_stats': batch_stats}, x, mutable=['batch_stats'],
                              rngs=rngs)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))  # the loss in float32, as the trainer's
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], 1)), new

  grad = jax.grad(loss, has_aux=True)
  seeds = getattr(args, 'seeds', 1)
  if seeds > 1:  # k models in one vmap-ed call, as config.num_seeds = k (each its own images)
    variables = jax.tree.map(lambda v: jnp.stack([v] * seeds), variables)
    x = jnp.asarray(rng.random((seeds,) + x.shape, np.float32))
    grad = jax.vmap(grad)
  steps_per_call = getattr(args, 'steps_per_call', 1)
  if steps_per_call > 1:
    if seeds > 1:
      raise harness.UsageError('--steps_per_call > 1 takes one seed')
    one_step = grad

    def grad(params, batch_stats, x):  # the steps of one trainer call: each applies its gradient
      def body(_, carry):
        params, batch_stats = carry
        grads, new = one_step(params, batch_stats, x)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), new.get('batch_stats', batch_stats)
      return jax.lax.fori_loop(0, steps_per_call, body, (params, batch_stats))
  grad = jax.jit(grad)
  return (lambda: jax.block_until_ready(grad(variables['params'], variables['batch_stats'], x))), model


def torch_train_step(args, threads: int, channels_last: bool = False):
  """A zero-argument function running one train step of the torch reference model (forward and loss under
  `autocast(args.dtype)`, backward, SGD) on a fixed random batch with `threads` threads."""
  import torch  # pylint: disable=g-import-not-at-top

  from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  config = default.get_config()
  config.model.name, config.model.width_multiplier = args.model, args.width
  if args.model in PRETRAINED_FAMILIES:
    from cifar_jax.torch_models import finetune  # pylint: disable=g-import-not-at-top
    config.model.image_size = getattr(args, 'image_size', 0)
    model = finetune.create_model(config.model, 10)
  else:
    model = torch_reference.create_torch_model(config.model)
  x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  optimizer = torch_reference.create_torch_optimizer(model.parameters(), config.optimizer)

  def step():
    with torch_reference.autocast(args.dtype, 'cpu'):
      loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  return step


# --mode=xla -----------------------------------------------------------------------------------------------


def _jax_profile(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  step, model = jax_gradient_step(args)
  step()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        step()
    path = glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'), recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    name = e.get('name', '')
    if e.get('ph') != 'X' or name.startswith(('$', 'end:')) or 'Thunk' in name or 'PjRt' in name:
      continue
    kind = re.sub(r'\.\d+$', '', name)
    total[kind] += e['dur'] / 1e3 / (args.steps * args.steps_per_call)  # us -> ms, per step
    count[kind] += 1 / (args.steps * args.steps_per_call)
  print(f'JAX {args.model} width {args.width}, batch {args.batch}, {args.seeds} seed(s), {args.dtype}, '
        f'{model.conv_impl} convolutions, {model.bn_impl} BatchNorm, {args.steps_per_call} step(s) a call: '
        'XLA ops, ms per gradient step\n')
  rows = [[f'{ms:.1f}', f'{count[kind]:.0f}', kind] for kind, ms in total.most_common(args.top)]
  rows.append([f'{sum(total.values()):.1f}', '', 'all ops'])
  print(harness.markdown_table(['ms a step', 'calls', 'XLA op'], rows))


def _torch_profile(args) -> None:
  import torch  # pylint: disable=g-import-not-at-top

  step = torch_train_step(args, args.torch_threads)
  for _ in range(2):
    step()
  start = time.perf_counter()
  for _ in range(args.steps):
    step()
  seconds = (time.perf_counter() - start) / args.steps
  print(f'\ntorch ({args.torch_threads} threads, {args.dtype}): {seconds * 1e3:.1f} ms a train step')
  with torch.profiler.profile() as prof:
    for _ in range(args.steps):
      step()
  print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=args.top))


# --mode=onednn --------------------------------------------------------------------------------------------


def worker(args) -> None:
  """--mode=onednn's framework process: two untimed steps, then --steps between the markers."""
  args.dtype = args.dtype or 'bfloat16'
  if args.worker == 'jax':
    step = jax_gradient_step(args)[0]
  else:
    step = torch_train_step(args, threads=ONEDNN_TORCH_THREADS, channels_last=args.channels_last)
  for _ in range(2):
    step()
  print(START, flush=True)
  for _ in range(args.steps):
    step()
  print(END, flush=True)


def summarize(lines, steps: int) -> tuple[dict, int]:
  """{(primitive, direction, implementation): ms per step} of the `exec` lines between the markers, and
  how many calls a step makes."""
  total, calls, inside = collections.Counter(), 0, False
  for line in lines:
    if line.startswith(START):
      inside = True
    elif line.startswith(END):
      break
    elif inside and line.startswith('onednn_verbose') and ',exec,' in line:
      fields = line.strip().split(',')
      i = fields.index('exec')
      kind, impl, direction = fields[i + 2], fields[i + 3], fields[i + 4]
      if kind == 'convolution' and DEPTHWISE.match(fields[-2]):
        kind = 'convolution (depthwise)'
      total[(kind, direction, impl)] += float(fields[-1]) / steps
      calls += 1
  return total, calls // max(steps, 1)


def _onednn_profile(args) -> None:
  flags = ['--mode=onednn', f'--model={args.model}', f'--image_size={args.image_size}',
           f'--width={args.width}', f'--batch={args.batch}', f'--steps={args.steps}', f'--dtype={args.dtype}',
           f'--conv={args.conv}', f'--steps_per_call={args.steps_per_call}'] + (
               ['--channels_last'] if args.channels_last else [])
  for framework in ('jax', 'torch'):
    out = subprocess.run(harness.worker_command('profile', framework, flags), capture_output=True, text=True,
                         env={**os.environ, 'ONEDNN_VERBOSE': '1'}, cwd=harness.ROOT, check=True).stdout
    steps = args.steps * (args.steps_per_call if framework == 'jax' else 1)
    total, calls = summarize(out.splitlines(), steps)
    label = 'torch channels_last' if framework == 'torch' and args.channels_last else framework
    if framework == 'jax':
      label += f' ({args.steps_per_call} step(s) a call)'
    print(f'\n{label}, {args.model} width {args.width}, batch {args.batch}, {args.dtype}: oneDNN ms per '
          f'gradient step ({calls} calls)\n')
    rows = [[f'{ms:.1f}', kind, direction, impl]
            for (kind, direction, impl), ms in sorted(total.items(), key=lambda kv: -kv[1])]
    rows.append([f'{sum(total.values()):.1f}', 'all oneDNN calls', '', ''])
    print(harness.markdown_table(['ms a step', 'primitive', 'direction', 'implementation'], rows))


def main(args) -> None:
  if args.mode == 'onednn':
    args.dtype = args.dtype or 'bfloat16'
    _onednn_profile(args)
    return
  args.dtype = args.dtype or 'float32'
  _jax_profile(args)
  if args.torch:
    _torch_profile(args)
