"""Throughput of k seeds in one run (k = 1, 2, 4 by default): what one more seed costs on this machine.

  python scripts/benchmark.py seeds --config=configs/one_cycle.py --seeds=1,2,4 --epochs=2 --rounds=3 \
      --set=model.width_multiplier=0.125 --set=data.source=synthetic --set=data.synthetic_train_size=2048

Each round trains every k in turn for `--epochs` epochs (fresh workdir under --workdir) with num_seeds=k, in
this process, and reads metrics.jsonl: images per second of the last epoch (all seeds together; compilation
is outside it). Rounds alternate the k values, so a change in the machine's load reaches every k alike; the
table gives each k's median over the rounds (and the range), per seed, and the time of an epoch relative to
k = 1 from the medians. Prints a markdown table and writes it to WORKDIR/bench_seeds.md.
"""

import os
import shutil

from bench import harness


def add_flags(parser) -> None:
  parser.add_argument('--config', default='configs/one_cycle.py')
  parser.add_argument('--seeds', default='1,2,4', help='comma-separated k values')
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=3, help='alternating rounds over the k values')
  parser.add_argument('--set', action='append', default=[], help='FIELD=VALUE override (repeatable)')
  parser.add_argument('--workdir', default='/tmp/bench_seeds')
  parser.add_argument('--json', default='', help='write the results here')


def main(args) -> None:
  import sweep  # pylint: disable=g-import-not-at-top  (scripts/sweep.py: its config loading and overrides)

  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top

  seeds = [int(x) for x in args.seeds.split(',')]

  def load(k: int):
    config, _ = sweep.load_config(args.config)
    config = sweep.apply_overrides(config, [sweep.parse_override(o) for o in args.set])
    config.num_seeds = k
    return config

  # The XLA:CPU settings cifar-jax uses, for the largest k: every k then runs on the same devices
  # (one CPU device when k > 1; see cifar_jax/cpu_backend.py).
  cpu_backend.configure(load(max(seeds)))
  import jax  # pylint: disable=g-import-not-at-top

  from cifar_jax import metrics_writer  # pylint: disable=g-import-not-at-top
  from cifar_jax import train  # pylint: disable=g-import-not-at-top

  compile_seconds, last, rounds = {}, {}, {k: 0 for k in seeds}

  def measure(k: int) -> float:
    config = load(k)
    config.num_epochs, config.progress_bar = args.epochs, False
    workdir = os.path.join(args.workdir, f'k{k}')
    shutil.rmtree(workdir, ignore_errors=True)
    train.train_and_evaluate(config, workdir)
    records = metrics_writer.read_metrics(workdir)
    compile_seconds.setdefault(k, records[0].get('compile_seconds', float('nan')))
    last['config'] = config
    rounds[k] += 1
    ips = records[-1]['images_per_second']
    # scripts/gpu/gpu_stages.py reads these lines as they come: 'k=K: IPS images/s ...'.
    print(f'k={k}: {ips:.0f} images/s (all seeds), round {rounds[k]}', flush=True)
    return ips

  runs = harness.alternate(seeds, args.rounds, measure, rotate=False)
  config = last['config']
  median = {k: harness.median(v) for k, v in runs.items()}
  rows = []
  for k in seeds:
    ratio = (k / median[k]) / (seeds[0] / median[seeds[0]])  # an epoch's time is k * examples / (images/s)
    rows.append([k, f'{median[k]:.0f} ({min(runs[k]):.0f}-{max(runs[k]):.0f})', f'{median[k] / k:.0f}',
                 f'{ratio:.2f}x', compile_seconds[k]])
  lines = [f'Config {args.config}: {config.model.name} width {config.model.width_multiplier}, batch '
           f'{config.batch_size}, {config.data.source} data; images/s of epoch {args.epochs} (of '
           f'{args.epochs}), median of {args.rounds} alternating round(s); {sweep.device_name()}, '
           f'{jax.device_count()} device(s).', '',
           harness.markdown_table(['seeds k', 'images/s, all seeds (median; range)', 'images/s per seed',
                                   'epoch time vs k = 1', 'compile (s, round 1)'], rows)]
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, 'bench_seeds.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  harness.write_json(args.json, {'args': {'config': args.config, 'seeds': seeds, 'epochs': args.epochs,
                                          'rounds': args.rounds, 'set': args.set},
                                 'rows': [{'k': k, 'images_per_second': median[k], 'rounds': runs[k],
                                           'compile_seconds': compile_seconds[k]} for k in seeds]})
