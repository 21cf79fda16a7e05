"""The benchmarks: one entry point, a family of measurements as its first argument.

  JAX_PLATFORMS=cpu python scripts/benchmark.py step --width=0.25 --json=/tmp/bench.json
  python scripts/benchmark.py finetune --model=efficientnet_lite0 --image_size=64 --batch=50
  python scripts/benchmark.py FAMILY --help      # a family's flags and what it measures

Each family is one file under scripts/bench/ (`FAMILIES` picks it by name); what every benchmark does (a
worker process per variant, alternating windows, medians, JSON and markdown rows, the machine's
fingerprint, peak memory) is scripts/bench/harness.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench import finetune
from bench import harness
from bench import step

FAMILIES = {
    'step': step,            # train-step and eval throughput, compile time, memory: JAX vs torch
    'finetune': finetune,    # fine-tuning steps of a pretrained family, JAX vs torch
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  families = parser.add_subparsers(dest='family', required=True, metavar='FAMILY')
  parsers = {}
  for name, module in FAMILIES.items():
    parsers[name] = families.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_flags(parsers[name])
    parsers[name].add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  module = FAMILIES[args.family]
  try:
    if args.worker:
      module.worker(args)
    else:
      module.main(args)
  except harness.UsageError as e:
    parsers[args.family].error(str(e))


if __name__ == '__main__':
  main()
