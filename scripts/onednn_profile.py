"""Where oneDNN's time goes in a ResNet18 gradient step: the trainer's oneDNN custom call (JAX, the
`onednn-cpu-gomp` wheel's oneDNN) against torch's own bundled oneDNN, by ONEDNN_VERBOSE's `exec` lines
summed per primitive kind, direction and implementation.

  JAX_PLATFORMS=cpu python scripts/onednn_profile.py --width=0.25 --dtype=bfloat16 --steps=3

Each framework runs in a child process with ONEDNN_VERBOSE=1: two untimed steps, then --steps steps
between markers; the table is milliseconds per step (oneDNN's own timing of each call). JAX: `jax.grad` of
the model's loss (BatchNorm in training mode) jitted with the trainer's CPU settings; torch: the reference
model's forward, loss and backward under autocast for bfloat16, 2 threads. Calls outside oneDNN (XLA's
fusions, torch's elementwise kernels) are not in the table.
"""

import argparse
import collections
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
START, END = '=== profile start', '=== profile end'


def _jax_child(args) -> None:
  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.cpu_devices = 1
  cpu_backend.configure(config)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cifar_jax import builders  # pylint: disable=g-import-not-at-top
  from cifar_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model('resnet18', width_multiplier=args.width, dtype=builders.DTYPES[args.dtype],
                              conv_impl=builders.conv_impl(config.model))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((args.batch, 32, 32, 3), np.float32))
  y = jnp.asarray(rng.integers(0, 10, args.batch))
  variables = model.init(jax.random.key(0), x[:2])

  def loss(params, batch_stats):
    logits, new = model.apply({'params': params, 'batch_stats': batch_stats}, x, mutable=['batch_stats'])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), y[:, None], 1)), new

  grad = jax.jit(jax.grad(loss, has_aux=True))
  _steps(args, lambda: jax.block_until_ready(grad(variables['params'], variables['batch_stats'])))


def _torch_child(args) -> None:
  import torch  # pylint: disable=g-import-not-at-top

  from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  config = default.get_config()
  config.model.width_multiplier = args.width
  model = torch_reference.create_torch_model(config.model)
  if args.channels_last:
    model = model.to(memory_format=torch.channels_last)
  x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
  if args.channels_last:
    x = x.contiguous(memory_format=torch.channels_last)

  def step():
    with torch_reference.autocast(args.dtype, 'cpu'):
      loss = torch.nn.functional.cross_entropy(model(x), y)
    model.zero_grad(set_to_none=True)
    loss.backward()

  _steps(args, step)


def _steps(args, step) -> None:
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
      total[(kind, direction, impl)] += float(fields[-1]) / steps
      calls += 1
  return total, calls // max(steps, 1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--width', type=float, default=0.25)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
  parser.add_argument('--channels_last', action='store_true', help='torch: channels_last')
  parser.add_argument('--child', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    {'jax': _jax_child, 'torch': _torch_child}[args.child](args)
    return
  for child in ('jax', 'torch'):
    cmd = [sys.executable, __file__, f'--child={child}'] + [a for a in sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'ONEDNN_VERBOSE': '1'},
                         check=True).stdout
    total, calls = summarize(out.splitlines(), args.steps)
    label = 'torch channels_last' if child == 'torch' and args.channels_last else child
    print(f'{label}, ResNet18 width {args.width}, batch {args.batch}, {args.dtype}: oneDNN ms per gradient '
          f'step ({calls} calls)')
    for (kind, direction, impl), ms in sorted(total.items(), key=lambda kv: -kv[1]):
      print(f'  {ms:8.1f} ms  {kind:12s} {direction:24s} {impl}')
    print(f'  {sum(total.values()):8.1f} ms  all oneDNN calls')


if __name__ == '__main__':
  main()
