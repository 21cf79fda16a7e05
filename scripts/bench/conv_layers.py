"""One convolution layer: forward, input gradient and weight gradient times, by implementation.

  JAX_PLATFORMS=cpu python scripts/benchmark.py conv_layers --layers=16x32,32x16,64x8,128x4
  JAX_PLATFORMS=cpu python scripts/benchmark.py conv_layers --kind=depthwise --batch=128

--kind=dense (the default): the CIFAR ResNets' 3x3 layers. --kind=depthwise: EfficientNet-Lite0's depthwise
layers (`LITE0_DEPTHWISE`, at 128 px; a layer is CHANNELSxSIZEkKERNELsSTRIDE, TensorFlow's 'SAME' padding
as the model pads), through XLA's grouped convolution (Eigen and YNNPACK), the shifted sums
(`efficientnet_lite.depthwise_shifted`), oneDNN's depthwise kernels (`onednn_conv`) and torch's
(`conv2d(groups=C)` after the same padding).

Each layer (channels x spatial size, batch --batch, stride 1, padding 1, NHWC) is timed in a worker process
per XLA:CPU setting, one after the other, since XLA reads its flags once: 'eigen' is what cifar-jax sets
(cifar_jax/cpu_backend.py: convolutions through XLA's Eigen path), 'ynn' XLA's default (convolutions through
YNNPACK), and 'torch' the same layer in PyTorch (NCHW and channels_last; forward, and forward plus backward
together since torch computes both gradients in one call). Medians of --repeats calls, in milliseconds.
Prints a markdown table.
"""

import functools
import os
import re
import statistics
import time

from bench import harness

SETTINGS = ('eigen', 'ynn', 'torch')
DEPTHWISE_SETTINGS = ('eigen', 'ynn', 'shifted', 'onednn', 'torch')
# EfficientNet-Lite0's depthwise layers at 128 px: channels x input size, kernel, stride.
LITE0_DEPTHWISE = ('32x64k3s1,96x64k3s2,144x32k3s1,144x32k5s2,240x16k5s1,240x16k3s2,480x8k3s1,480x8k5s1,'
                   '672x8k5s1')


def add_flags(parser) -> None:
  parser.add_argument('--kind', default='dense', choices=('dense', 'depthwise'))
  parser.add_argument('--layers', default='',
                      help='comma-separated CHANNELSxSIZE (dense; default: ResNet18 width 0.25 stages, then '
                           'width 1) or CHANNELSxSIZEkKERNELsSTRIDE (depthwise; default: Lite0\'s layers)')
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


def _layers(args) -> list[tuple[str, int, int, int, int]]:
  """(name, channels, size, kernel, stride) of each --layers entry (the kind's default when empty)."""
  spec = args.layers or (LITE0_DEPTHWISE if args.kind == 'depthwise' else '16x32,32x16,64x8,128x4,64x32')
  out = []
  for layer in spec.split(','):
    m = re.fullmatch(r'(\d+)x(\d+)(?:k(\d+))?(?:s(\d+))?', layer)
    if not m:
      raise harness.UsageError(f'--layers: {layer!r} is not CHANNELSxSIZE[kKERNEL][sSTRIDE]')
    out.append((layer, int(m[1]), int(m[2]), int(m[3] or 3), int(m[4] or 1)))
  return out


def _padding(kind: str, k: int, stride: int):
  """torch's padding 1 for the dense 3x3 layers; TensorFlow's 'SAME' (Lite0's) for the depthwise ones."""
  if kind == 'dense':
    return ((1, 1), (1, 1))
  total = k - 1 if stride == 1 else k - 2
  return ((total // 2, total - total // 2),) * 2


def _jax_layers(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cifar_jax import onednn_conv  # pylint: disable=g-import-not-at-top
  from cifar_jax.models import efficientnet_lite  # pylint: disable=g-import-not-at-top

  out = {}
  for layer, c, s, k, stride in _layers(args):
    rng = np.random.default_rng(0)
    depthwise = args.kind == 'depthwise'
    padding = _padding(args.kind, k, stride)
    x = jax.numpy.asarray(rng.standard_normal((args.batch, s, s, c)), args.dtype)
    w = jax.numpy.asarray(rng.standard_normal((k, k, 1 if depthwise else c, c)) * 0.05, args.dtype)
    groups = c if depthwise else 1
    if args.worker == 'shifted':
      conv = lambda x, w: efficientnet_lite.depthwise_shifted(x, w, stride, padding)  # pylint: disable=cell-var-from-loop
    else:
      impl = onednn_conv.conv_general_dilated if args.worker == 'onednn' else jax.lax.conv_general_dilated
      conv = functools.partial(impl, window_strides=(stride, stride), padding=padding,  # pylint: disable=cell-var-from-loop
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)
    dy = jax.numpy.asarray(rng.standard_normal(jax.eval_shape(conv, x, w).shape), args.dtype)

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
  for layer, c, s, k, stride in _layers(args):
    (top, bottom), (left, right) = _padding(args.kind, k, stride)
    groups = c if args.kind == 'depthwise' else 1
    for channels_last in (False, True):
      x = torch.randn(args.batch, c, s, s)
      if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
      x.requires_grad_()
      w = torch.randn(c, c // groups, k, k, requires_grad=True)
      conv = lambda x, w: torch.nn.functional.conv2d(  # pylint: disable=cell-var-from-loop
          torch.nn.functional.pad(x, (left, right, top, bottom)), w, stride=stride, groups=groups)  # pylint: disable=cell-var-from-loop
      with torch.no_grad():
        dy = torch.randn_like(conv(x, w))

      def forward():
        with torch.no_grad():
          conv(x, w)  # pylint: disable=cell-var-from-loop

      def forward_backward():
        conv(x, w).backward(dy)  # pylint: disable=cell-var-from-loop

      key = 'torch_channels_last' if channels_last else 'torch'
      out.setdefault(layer, {})[key] = {'forward': _time(forward, args.repeats),
                                        'forward_backward': _time(forward_backward, args.repeats)}
  return out


def worker(args) -> None:
  layers = _torch_layers if args.worker == 'torch' else _jax_layers
  harness.serve({}, {'run': lambda: layers(args)})


def main(args) -> None:
  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top

  layers = _layers(args)
  flags = [f'--kind={args.kind}', f'--layers={",".join(layer[0] for layer in layers)}',
           f'--batch={args.batch}', f'--repeats={args.repeats}', f'--dtype={args.dtype}',
           f'--torch_threads={args.torch_threads}']
  base = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  # The shifted sums and oneDNN run with what cifar-jax sets (Eigen for XLA's own convolutions).
  xla_flags = {'eigen': cpu_backend.EIGEN_CONVOLUTIONS, 'ynn': '', 'shifted': cpu_backend.EIGEN_CONVOLUTIONS,
               'onednn': cpu_backend.EIGEN_CONVOLUTIONS}
  settings = DEPTHWISE_SETTINGS if args.kind == 'depthwise' else SETTINGS
  results, memory = {}, {}
  for name in settings:  # one after the other: a layer's time is its worker's alone
    env = dict(base, XLA_FLAGS=xla_flags.get(name, ''), JAX_PLATFORMS=base.get('JAX_PLATFORMS', 'cpu'))
    with harness.workers({name: harness.worker_command('conv_layers', name, flags)}, env=env) as procs:
      results[name] = procs[name].ask('run')
      memory[name] = procs[name].finish()['peak_rss_mb']

  print(f'batch {args.batch}, JAX {args.dtype}, torch float32, ms per call (median of {args.repeats}); '
        f'{os.cpu_count()} CPUs\n')
  jax_cell = lambda r: f"{r['forward']:.1f} / {r['input_grad']:.1f} / {r['weight_grad']:.1f}"
  torch_cell = lambda r: f"{r['forward']:.1f} / {r['forward_backward']:.1f}"
  jax_settings = [n for n in settings if n != 'torch']
  names = {'eigen': 'XLA Eigen', 'ynn': 'XLA YNNPACK', 'shifted': 'shifted sums', 'onednn': 'oneDNN'}
  rows = []
  for layer, c, s, k, stride in layers:
    t = results['torch'][layer]
    shape = f'{c} x {s}x{s}' + (f', {k}x{k} stride {stride}' if args.kind == 'depthwise' else '')
    rows.append([shape] + [jax_cell(results[n][layer]) for n in jax_settings]
                + [torch_cell(t['torch']), torch_cell(t['torch_channels_last'])])
  headers = ['layer (C x HxW)'] + [f'{names[n]} fwd / dx / dw' for n in jax_settings]
  print(harness.markdown_table(headers + ['torch fwd / fwd+bwd', 'torch channels_last fwd / fwd+bwd'], rows))
  harness.write_json(args.json, {'args': {'kind': args.kind, 'layers': [layer[0] for layer in layers],
                                          'batch': args.batch, 'repeats': args.repeats, 'dtype': args.dtype,
                                          'torch_threads': args.torch_threads},
                                 'ms': results, 'peak_rss_mb': memory})
