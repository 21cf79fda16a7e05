"""What k seeds cost one oneDNN convolution layer: the layer's gradient for k vmap-ed seeds against one.

  JAX_PLATFORMS=cpu python scripts/bench_seed_convs.py --layers=8x32,16x16,32x8,64x4 --seeds=2

Each layer (channels x spatial size, batch --batch, 3x3, stride 1, padding 1, NHWC, float32) times the
jitted gradient, with respect to input and kernel, of sum(conv(x, w)**2) through `onednn_conv`: for one
seed, and `jax.vmap`-ed over --seeds seeds (each its own input and kernel: one batched call, the seeds side
by side on the cores). Medians of --repeats calls, alternating the two; the ratio is what one more seed
costs (k when the seeds gain nothing from sharing a call). Prints a markdown table.
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', default='8x32,16x16,32x8,64x4,16x32,32x16,64x8,128x4',
                      help='comma-separated CHANNELSxSIZE (ResNet18 width 0.125, then 0.25, stages)')
  parser.add_argument('--seeds', type=int, default=2)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=20)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cifar_jax import onednn_conv  # pylint: disable=g-import-not-at-top

  onednn_conv.load()
  k = args.seeds

  def conv(x, w):
    return onednn_conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  grad = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))
  one, batched = jax.jit(grad), jax.jit(jax.vmap(grad))
  rng = np.random.default_rng(0)
  lines = [f'oneDNN 3x3 convolution gradient, batch {args.batch}: {k} vmap-ed seeds against one '
           f'({jax.devices()[0].device_kind}, {os.cpu_count()} cores); medians of {args.repeats}.', '',
           '| channels x size | one seed (ms) | {k} seeds (ms) | ratio |'.replace('{k}', str(k)),
           '| --- | --- | --- | --- |']
  for layer in args.layers.split(','):
    c, s = (int(v) for v in layer.split('x'))
    x = jnp.asarray(rng.normal(size=(k, args.batch, s, s, c)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, 3, 3, c, c)) / np.sqrt(9 * c), jnp.float32)
    calls = {'one': lambda x=x, w=w: jax.block_until_ready(one(x[0], w[0])),
             'batched': lambda x=x, w=w: jax.block_until_ready(batched(x, w))}
    times = {name: [] for name in calls}
    for call in calls.values():
      call()  # compile
    for _ in range(args.repeats):
      for name, call in calls.items():
        start = time.perf_counter()
        call()
        times[name].append((time.perf_counter() - start) * 1e3)
    t1, tk = statistics.median(times['one']), statistics.median(times['batched'])
    lines.append(f'| {c} x {s}x{s} | {t1:.2f} | {tk:.2f} | {tk / t1:.2f}x |')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
