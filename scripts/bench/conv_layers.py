"""One 3x3 convolution layer of the CIFAR ResNets: forward, input gradient and weight gradient times.

  JAX_PLATFORMS=cpu python scripts/benchmark.py conv_layers --layers=16x32,32x16,64x8,128x4

Each layer (channels x spatial size, batch --batch, stride 1, padding 1, NHWC) is timed in a worker process
per XLA:CPU setting, one after the other, since XLA reads its flags once: 'eigen' is what cifar-jax sets
(cifar_jax/cpu_backend.py: convolutions through XLA's Eigen path), 'ynn' XLA's default (convolutions through
YNNPACK), and 'torch' the same layer in PyTorch (NCHW and channels_last; forward, and forward plus backward
together since torch computes both gradients in one call). Medians of --repeats calls, in milliseconds.
Prints a markdown table.
"""

import os
import statistics
import time

from bench import harness

SETTINGS = ('eigen', 'ynn', 'torch')


def add_flags(parser) -> None:
  parser.add_argument('--layers', default='16x32,32x16,64x8,128x4,64x32',
                      help='comma-separated CHANNELSxSIZE (ResNet18 width 0.25 stages, then width 1)')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='the JAX layers\' dtype (torch stays float32)')
  parser.add_argument('--torch_threads', type=int, default=os.cpu_count())
  parser.add_argument('--json', default='', help='write the results here')


def _time(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def _jax_layers(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  out = {}
  for layer in args.layers.split(','):
    c, s = (int(v) for v in layer.split('x'))
    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.standard_normal((args.batch, s, s, c)), args.dtype)
    w = jax.numpy.asarray(rng.standard_normal((3, 3, c, c)) * 0.05, args.dtype)
    dy = jax.numpy.asarray(rng.standard_normal((args.batch, s, s, c)), args.dtype)

    def conv(x, w):
      return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[0])
    dw = jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[1])
    out[layer] = {
        'forward': _time(lambda: fwd(x, w).block_until_ready(), args.repeats),
        'input_grad': _time(lambda: dx(x, w, dy).block_until_ready(), args.repeats),
        'weight_grad': _time(lambda: dw(x, w, dy).block_until_ready(), args.repeats),
    }
  return out


def _torch_layers(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.torch_threads)
  out = {}
  for layer in args.layers.split(','):
    c, s = (int(v) for v in layer.split('x'))
    for channels_last in (False, True):
      x = torch.randn(args.batch, c, s, s)
      if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
      x.requires_grad_()
      w = torch.randn(c, c, 3, 3, requires_grad=True)
      dy = torch.randn(args.batch, c, s, s)

      def forward():
        with torch.no_grad():
          torch.nn.functional.conv2d(x, w, padding=1)

      def forward_backward():
        torch.nn.functional.conv2d(x, w, padding=1).backward(dy)

      key = 'torch_channels_last' if channels_last else 'torch'
      out.setdefault(layer, {})[key] = {'forward': _time(forward, args.repeats),
                                        'forward_backward': _time(forward_backward, args.repeats)}
  return out


def worker(args) -> None:
  layers = _torch_layers if args.worker == 'torch' else _jax_layers
  harness.serve({}, {'run': lambda: layers(args)})


def main(args) -> None:
  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top

  flags = [f'--layers={args.layers}', f'--batch={args.batch}', f'--repeats={args.repeats}',
           f'--dtype={args.dtype}', f'--torch_threads={args.torch_threads}']
  base = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  xla_flags = {'eigen': cpu_backend.EIGEN_CONVOLUTIONS, 'ynn': ''}
  results, memory = {}, {}
  for name in SETTINGS:  # one after the other: a layer's time is its worker's alone
    env = dict(base, XLA_FLAGS=xla_flags.get(name, ''), JAX_PLATFORMS=base.get('JAX_PLATFORMS', 'cpu'))
    with harness.workers({name: harness.worker_command('conv_layers', name, flags)}, env=env) as procs:
      results[name] = procs[name].ask('run')
      memory[name] = procs[name].finish()['peak_rss_mb']

  print(f'batch {args.batch}, JAX {args.dtype}, torch float32, ms per call (median of {args.repeats}); '
        f'{os.cpu_count()} CPUs\n')
  jax_cell = lambda r: f"{r['forward']:.1f} / {r['input_grad']:.1f} / {r['weight_grad']:.1f}"
  torch_cell = lambda r: f"{r['forward']:.1f} / {r['forward_backward']:.1f}"
  rows = []
  for layer in args.layers.split(','):
    e, y, t = results['eigen'][layer], results['ynn'][layer], results['torch'][layer]
    c, s = layer.split('x')
    rows.append([f'{c} x {s}x{s}', jax_cell(e), jax_cell(y), torch_cell(t['torch']),
                 torch_cell(t['torch_channels_last'])])
  print(harness.markdown_table(['layer (C x HxW)', 'XLA Eigen fwd / dx / dw', 'XLA YNNPACK fwd / dx / dw',
                                'torch fwd / fwd+bwd', 'torch channels_last fwd / fwd+bwd'], rows))
  harness.write_json(args.json, {'args': {'layers': args.layers, 'batch': args.batch, 'repeats': args.repeats,
                                          'dtype': args.dtype, 'torch_threads': args.torch_threads},
                                 'ms': results, 'peak_rss_mb': memory})
