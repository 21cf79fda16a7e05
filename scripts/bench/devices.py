"""Train-step throughput on 1 vs N devices with the same global batch, measured in one run.

  JAX_PLATFORMS=cpu python scripts/benchmark.py devices --runs=1:jit,2:jit,2:pmap

Each run (device count and parallelism) is a worker process, since JAX fixes the device count when it
starts: N virtual CPU devices (--xla_force_host_platform_device_count) on CPU, the first N GPUs on GPU. They
all compile first, then take turns (in the order of --runs, every window): one timed window of --steps train
steps each, --windows times over, so a noisy or shared machine slows every run alike. Prints each window and
the median global images per second. The step is the trainer's own (`steps.train_step_on_device_data`
wrapped by `parallel.Parallel`, the step family's `synthetic_step`), fed synthetic images, with no host
synchronisation inside a window.
"""

import os
import time

from bench import harness
from bench import step


def add_flags(parser) -> None:
  parser.add_argument('--runs', default='1:jit,2:jit',
                      help='comma-separated DEVICES:PARALLELISM, e.g. 1:jit,2:jit,2:pmap')
  parser.add_argument('--model', default='resnet18')
  parser.add_argument('--width', type=float, default=0.25, help='model.width_multiplier')
  parser.add_argument('--batch_size', type=int, default=128, help='the global batch')
  parser.add_argument('--steps', type=int, default=10, help='train steps per timed window')
  parser.add_argument('--windows', type=int, default=5, help='timed windows per run')
  parser.add_argument('--json', default='', help='write the results here')


def worker(args) -> None:
  """Compiles the step, says ready, then times one window per 'train' line on stdin."""
  num_devices, mode = args.worker.split(':')
  # Only the platform JAX picks counts: N virtual CPU devices, or the first N GPUs.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={num_devices}')
  gpus = os.environ.get('CUDA_VISIBLE_DEVICES', ','.join(map(str, range(int(num_devices)))))
  os.environ['CUDA_VISIBLE_DEVICES'] = ','.join(gpus.split(',')[:int(num_devices)])
  import jax  # pylint: disable=g-import-not-at-top

  from cifar_jax import parallel  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.model.name, config.model.width_multiplier = args.model, args.width
  config.batch_size = args.batch_size
  config.model.conv = 'xla'  # XLA's convolutions on every device count (oneDNN's run on one device)
  config.steps_per_dispatch = 1
  par = parallel.create(mode)
  assert par.num_devices == int(num_devices), (par.num_devices, num_devices)
  run, state, acc, _ = step.synthetic_step(config, par, args.batch_size, 1)
  holder = {}
  holder['state'], holder['acc'] = run(state, acc, 2)  # warm up
  jax.block_until_ready(holder['state'])

  def window():
    start = time.perf_counter()
    holder['state'], holder['acc'] = run(holder['state'], holder['acc'], args.steps)
    jax.block_until_ready((holder['state'], holder['acc']))
    return {'images_per_second': args.steps * args.batch_size / (time.perf_counter() - start)}

  harness.serve({'devices': [str(d) for d in jax.devices()]}, {'train': window})


def main(args) -> None:
  runs = [r for r in args.runs.split(',') if r]
  if not runs or any(len(r.split(':')) != 2 for r in runs):
    raise harness.UsageError(f'--runs: comma-separated DEVICES:PARALLELISM; got {args.runs!r}')
  flags = [f'--model={args.model}', f'--width={args.width}', f'--batch_size={args.batch_size}',
           f'--steps={args.steps}']
  on_ready = lambda w: print(f'{w.name}: ready on {w.ready["devices"]}', flush=True)
  on_window = lambda index, rates: print(
      f'window {index + 1}: ' + ', '.join(f'{run} {rates[run][-1]:.0f}' for run in runs), flush=True)
  with harness.workers({r: harness.worker_command('devices', r, flags) for r in runs},
                       on_ready=on_ready) as procs:
    rates = harness.alternate(runs, args.windows, lambda r: procs[r].ask('train')['images_per_second'],
                              rotate=False, on_window=on_window)
    memory = {r: procs[r].finish() for r in runs}
    devices = {r: procs[r].ready['devices'] for r in runs}
  base = harness.median(rates[runs[0]])
  rows = [{'run': r, 'images_per_second': harness.median(rates[r]),
           'over_first': harness.median(rates[r]) / base, 'windows': rates[r],
           'peak_rss_mb': memory[r]['peak_rss_mb'], 'devices': devices[r]} for r in runs]
  print(f'\n{args.model} width {args.width}, global batch {args.batch_size}, {args.steps} steps x '
        f'{args.windows} windows; median images/s:\n')
  cells = [[r['run'], r['images_per_second'], f"{r['over_first']:.2f}x", r['peak_rss_mb']] for r in rows]
  print(harness.markdown_table(['run', 'images/s', f'vs {runs[0]}', 'peak RSS (MiB)'], cells))
  harness.write_json(args.json, {'args': {'runs': runs, 'model': args.model, 'width': args.width,
                                          'batch_size': args.batch_size, 'steps': args.steps,
                                          'windows': args.windows}, 'rows': rows})
