"""Train-step throughput on 1 vs N devices with the same global batch, measured in one run.

  JAX_PLATFORMS=cpu python scripts/bench_devices.py --runs=1:jit,2:jit,2:pmap

Each run (device count and parallelism) is a subprocess, since JAX fixes the device count when it starts:
N virtual CPU devices (--xla_force_host_platform_device_count) on CPU, the first N GPUs on GPU. They all
compile first, then take turns: one timed window of --steps train steps each, --windows times over, so a
noisy or shared machine slows every run alike. Prints each window and the median global images per second.
The step is the trainer's own (`steps.train_step_on_device_data` wrapped by `parallel.Parallel`), fed
synthetic images, with no host synchronisation inside a window.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(args) -> None:
  """Compiles the step, says 'ready', then times one window per 'go' line on stdin."""
  num_devices, mode = args.worker.split(':')
  # Only the platform JAX picks counts: N virtual CPU devices, or the first N GPUs.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={num_devices}')
  gpus = os.environ.get('CUDA_VISIBLE_DEVICES', ','.join(map(str, range(int(num_devices)))))
  os.environ['CUDA_VISIBLE_DEVICES'] = ','.join(gpus.split(',')[:int(num_devices)])
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, 'scripts'))
  import jax  # pylint: disable=g-import-not-at-top

  from bench import step  # pylint: disable=g-import-not-at-top
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
  state, acc = run(state, acc, 2)  # warm up
  jax.block_until_ready(state)
  print(json.dumps({'ready': True, 'devices': [str(d) for d in jax.devices()]}), flush=True)
  for line in sys.stdin:
    if line.strip() != 'go':
      break
    start = time.perf_counter()
    state, acc = run(state, acc, args.steps)
    jax.block_until_ready((state, acc))
    seconds = time.perf_counter() - start
    print(json.dumps({'images_per_second': args.steps * args.batch_size / seconds}), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', default='1:jit,2:jit',
                      help='comma-separated DEVICES:PARALLELISM, e.g. 1:jit,2:jit,2:pmap')
  parser.add_argument('--model', default='resnet18')
  parser.add_argument('--width', type=float, default=0.25, help='model.width_multiplier')
  parser.add_argument('--batch_size', type=int, default=128, help='the global batch')
  parser.add_argument('--steps', type=int, default=10, help='train steps per timed window')
  parser.add_argument('--windows', type=int, default=5, help='timed windows per run')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(args)
    return

  runs = args.runs.split(',')
  common = [f'--model={args.model}', f'--width={args.width}', f'--batch_size={args.batch_size}',
            f'--steps={args.steps}']
  procs = {run: subprocess.Popen([sys.executable, os.path.abspath(__file__), f'--worker={run}'] + common,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
           for run in runs}
  for run, proc in procs.items():
    ready = proc.stdout.readline()
    if not ready:
      sys.exit(f'{run}: the worker failed to start')
    print(f'{run}: ready on {json.loads(ready)["devices"]}', flush=True)
  rates = {run: [] for run in runs}
  for window in range(args.windows):
    for run, proc in procs.items():
      proc.stdin.write('go\n')
      proc.stdin.flush()
      rates[run].append(json.loads(proc.stdout.readline())['images_per_second'])
    print(f'window {window + 1}: ' + ', '.join(f'{run} {rates[run][-1]:.0f}' for run in runs),
          flush=True)
  for proc in procs.values():
    proc.stdin.close()
    proc.wait(timeout=60)
  print(f'{args.model} width {args.width}, global batch {args.batch_size}, {args.steps} steps x '
        f'{args.windows} windows; median images/s:')
  base = statistics.median(rates[runs[0]])
  for run in runs:
    median = statistics.median(rates[run])
    print(f'  {run:>8}: {median:8.1f}  ({median / base:.2f}x {runs[0]})')


if __name__ == '__main__':
  main()
