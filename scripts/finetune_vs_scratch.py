"""Fine-tuning EfficientNet-Lite0's ImageNet weights against the blog's ResNet18 from scratch at equal CPU
time (RESULTS.md, issue 25): three Lite0 runs (linear probe; full fine-tune with BatchNorm frozen; with
BatchNorm training), then ResNet18 at widths 0.25 and 0.5 for as many epochs as take the larger full
fine-tune's CPU seconds (from a 2-epoch timing run of each). Every run is `cifar-jax` with 3 seeds in one
process, timed by /usr/bin/time (user + sys, start-up and compilation included).

  python scripts/finetune_vs_scratch.py --data=/tmp/c10_2k_val2k.npz --validation_size=2000 --out=/tmp/r25

Prints a line per run (CPU s, wall s, the last epochs' mean held-out accuracy) and writes OUT/summary.json.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LITE = ['--config=configs/finetune_efficientnet_lite0.py', '--config.model.image_size=64',
        '--config.model.resize_size=0', '--config.schedule.warmup_steps=10', '--config.optimizer.lr=0.05',
        '--config.num_epochs=5']
FINETUNE = {
    'probe': LITE + ['--config.finetune.frozen=backbone', '--config.model.frozen_bn=True'],
    'full_frozen_bn': LITE + ['--config.model.frozen_bn=True'],
    'full_bn_trained': LITE,
}
SCRATCH = {'scratch25': ['--config=configs/one_cycle.py', '--config.model.width_multiplier=0.25'],
           'scratch50': ['--config=configs/one_cycle.py', '--config.model.width_multiplier=0.5']}


def run(args, name: str, flags: list[str]) -> tuple[float, float, list[dict]]:
  """(CPU s, wall s, metrics records) of one `cifar-jax` run in OUT/name."""
  workdir, timing = os.path.join(args.out, name), os.path.join(args.out, f'{name}.time')
  shutil.rmtree(workdir, ignore_errors=True)
  common = ['--config.data.source=npz', f'--config.data.path={args.data}',
            f'--config.data.validation_size={args.validation_size}', '--config.seed=0',
            '--config.compilation_cache=', '--config.progress_bar=False', '--config.num_seeds=3',
            '--config.batch_size=50', '--config.eval_batch_size=500']
  cmd = ['/usr/bin/time', '-f', '%U %S %e', '-o', timing, sys.executable, '-m', 'cifar_jax.main',
         f'--workdir={workdir}'] + flags + common
  with open(os.path.join(args.out, f'{name}.log'), 'w') as log:
    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
  with open(timing) as f:
    user, system, wall = map(float, f.read().split()[-3:])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  accuracy = [round(r['eval_accuracy'], 4) for r in records if 'eval_accuracy' in r][-3:]
  print(f'{name}: CPU {user + system:.1f} s, wall {wall:.0f} s, held-out accuracy {accuracy}', flush=True)
  return user + system, wall, records


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', required=True, help='an .npz with x_train, y_train (held-out images last)')
  parser.add_argument('--validation_size', type=int, default=2000)
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  results = {name: run(args, name, flags) for name, flags in FINETUNE.items()}
  target = max(results['full_frozen_bn'][0], results['full_bn_trained'][0])
  for name, flags in SCRATCH.items():
    cpu, wall, records = run(args, f'{name}_timing', flags + ['--config.num_epochs=2'])
    elapsed = [r['elapsed_seconds'] for r in records if 'elapsed_seconds' in r]
    per_epoch = cpu * (elapsed[-1] - elapsed[-2]) / wall  # epoch 2's share of the process's CPU time
    fixed = cpu - 2 * per_epoch
    epochs = max(1, round((target - fixed) / per_epoch))
    print(f'{name}: {per_epoch:.1f} CPU s an epoch, {fixed:.1f} s fixed -> {epochs} epochs for '
          f'{target:.1f} s', flush=True)
    results[name] = run(args, name, flags + [f'--config.num_epochs={epochs}'])
  with open(os.path.join(args.out, 'summary.json'), 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main()
