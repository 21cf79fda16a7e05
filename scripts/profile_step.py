"""Where a ResNet18 train step's time goes: XLA ops of the JAX gradient step, and torch's profiler table.

  JAX_PLATFORMS=cpu taskset -c 0 python scripts/profile_step.py --width=0.25

JAX: the loss gradient of the model (BatchNorm in training mode), jitted, with cifar-jax's XLA:CPU
settings (cifar_jax/cpu_backend.py, one device), traced by jax.profiler over --steps calls; prints the time
per step of each kind of XLA op (convolution, transpose_copy_fusion, ...) and their sum. torch (with
--torch): the reference model's full train step under torch.profiler, --torch_threads threads, ms per
step and the top ops. Pin to one core (taskset) to compare with one torch thread.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


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

  model = models.create_model(args.model, width_multiplier=args.width, dtype=builders.DTYPES[args.dtype],
                              conv_impl=builders.conv_impl(config.model))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((args.batch, 32, 32, 3), np.float32))
  y = jnp.asarray(rng.integers(0, 10, args.batch))
  variables = model.init(jax.random.key(0), x[:2])

  def loss(params, batch_stats, x):
    logits, new = model.apply({'params': params, 'batch_stats': batch_stats}, x, mutable=['batch_stats'])
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))  # the loss in float32, as the trainer's
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], 1)), new

  grad = jax.grad(loss, has_aux=True)
  seeds = getattr(args, 'seeds', 1)
  if seeds > 1:  # k models in one vmap-ed call, as config.num_seeds = k (each its own images)
    variables = jax.tree.map(lambda v: jnp.stack([v] * seeds), variables)
    x = jnp.asarray(rng.random((seeds,) + x.shape, np.float32))
    grad = jax.vmap(grad)
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
    total[kind] += e['dur'] / 1e3 / args.steps  # us -> ms, per step
    count[kind] += 1 / args.steps
  print(f'JAX {args.model} width {args.width}, batch {args.batch}, {args.seeds} seed(s), {args.dtype}, '
        f'{model.conv_impl} convolutions: XLA ops, ms per gradient step')
  for kind, ms in total.most_common(args.top):
    print(f'  {ms:8.1f} ms  x{count[kind]:4.0f}  {kind}')
  print(f'  {sum(total.values()):8.1f} ms  all ops')


def _torch_profile(args) -> None:
  import torch  # pylint: disable=g-import-not-at-top

  step = torch_train_step(args, args.torch_threads)
  for _ in range(2):
    step()
  start = time.perf_counter()
  for _ in range(args.steps):
    step()
  seconds = (time.perf_counter() - start) / args.steps
  print(f'torch ({args.torch_threads} threads, {args.dtype}): {seconds * 1e3:.1f} ms a train step')
  with torch.profiler.profile() as prof:
    for _ in range(args.steps):
      step()
  print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=args.top))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='resnet18')
  parser.add_argument('--width', type=float, default=0.25)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--seeds', type=int, default=1, help='k models in one vmap-ed step')
  parser.add_argument('--top', type=int, default=15)
  parser.add_argument('--conv', default='auto', help="config.model.conv: auto | xla | onednn")
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='model.dtype (torch: autocast(bfloat16))')
  parser.add_argument('--torch', action='store_true', help='also profile the torch reference')
  parser.add_argument('--torch_threads', type=int, default=1)
  args = parser.parse_args()
  _jax_profile(args)
  if args.torch:
    _torch_profile(args)


if __name__ == '__main__':
  main()
