"""Several train steps per dispatch: the trainer's own call (`program.Program`) of K steps.

  JAX_PLATFORMS=cpu python scripts/bench_dispatch.py --width=0.25 --steps_per_call=1,4,8

Measures the lever issue 7 lists ("several steps per dispatch") before the trainer adopts it: seconds per
step, minor page faults per step and kernel (sys) CPU seconds per step, on one device with `cifar-jax`'s
CPU settings (cpu_backend.configure). On XLA:CPU every call allocates its temporary buffers afresh
(hundreds of MB for ResNet18), so the kernel zero-fills new pages on every step; inside one call the loop
reuses them. Each K runs in its own process, one after the other (a noisy machine: compare within a run).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'scripts'))


def _measure(args) -> dict:
  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.width_multiplier, config.cpu_devices = args.width, 1
  cpu_backend.configure(config)
  config.steps_per_dispatch = args.worker
  import benchmark  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from cifar_jax import parallel  # pylint: disable=g-import-not-at-top

  k = args.worker
  run, state, acc, _ = benchmark.synthetic_step(config, parallel.create('jit'), args.batch, args.batch)

  def call(state, acc):
    return run(state, acc, k)

  for _ in range(2):
    state, acc = call(state, acc)
  jax.block_until_ready(state)
  calls = max(1, args.steps // k)
  before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(calls):
    state, acc = call(state, acc)
  jax.block_until_ready(state)
  seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
  n = calls * k
  return {'steps_per_call': k, 'seconds_per_step': seconds / n,
          'minor_faults_per_step': (after.ru_minflt - before.ru_minflt) / n,
          'sys_seconds_per_step': (after.ru_stime - before.ru_stime) / n}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--width', type=float, default=0.25)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=16, help='timed steps per K')
  parser.add_argument('--steps_per_call', default='1,4,8')
  parser.add_argument('--worker', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(_measure(args)))
    return
  print(f'ResNet18 width {args.width}, batch {args.batch}, one device')
  base = None
  for k in [int(v) for v in args.steps_per_call.split(',')]:
    out = subprocess.run([sys.executable, __file__, f'--worker={k}', f'--width={args.width}',
                          f'--batch={args.batch}', f'--steps={args.steps}'],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    base = base or r['seconds_per_step']
    print(f"  K={k}: {r['seconds_per_step']:.3f} s/step ({base / r['seconds_per_step']:.2f}x), "
          f"{r['minor_faults_per_step']:.0f} page faults/step, {r['sys_seconds_per_step']:.3f} s sys/step")


if __name__ == '__main__':
  main()
