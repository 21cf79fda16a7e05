"""Where oneDNN's time goes in a ResNet18 gradient step: the trainer's oneDNN custom call (JAX, the
`onednn-cpu-gomp` wheel's oneDNN) against torch's own bundled oneDNN, by ONEDNN_VERBOSE's `exec` lines
summed per primitive kind, direction and implementation.

  JAX_PLATFORMS=cpu python scripts/onednn_profile.py --width=0.25 --dtype=bfloat16 --steps=3

Each framework runs in a child process with ONEDNN_VERBOSE=1: two untimed steps, then --steps steps
between markers; the table is milliseconds per step (oneDNN's own timing of each call). The steps are
`scripts/profile_step.py`'s: JAX's jitted loss gradient (BatchNorm in training mode) with the trainer's
CPU settings; torch's train step (forward and loss under autocast for bfloat16, backward, SGD), 2
threads. Calls outside oneDNN (XLA's fusions, torch's elementwise kernels and optimizer) are not in it.
"""

import argparse
import collections
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import profile_step  # noqa: E402  (its JAX gradient step and torch train step)

START, END = '=== profile start', '=== profile end'


def _jax_child(args) -> None:
  _steps(args, profile_step.jax_gradient_step(args)[0])


def _torch_child(args) -> None:
  _steps(args, profile_step.torch_train_step(args, threads=2, channels_last=args.channels_last))


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
  parser.add_argument('--model', default='resnet18')
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
    print(f'{label}, {args.model} width {args.width}, batch {args.batch}, {args.dtype}: oneDNN ms per '
          f'gradient step ({calls} calls)')
    for (kind, direction, impl), ms in sorted(total.items(), key=lambda kv: -kv[1]):
      print(f'  {ms:8.1f} ms  {kind:12s} {direction:24s} {impl}')
    print(f'  {sum(total.values()):8.1f} ms  all oneDNN calls')


if __name__ == '__main__':
  main()
