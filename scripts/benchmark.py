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

from bench import checkpoint
from bench import conv_layers
from bench import corruptions
from bench import devices
from bench import evaluation
from bench import finetune
from bench import harness
from bench import profile
from bench import seeds
from bench import shake
from bench import startup
from bench import step

FAMILIES = {
    'step': step,                # train-step and eval throughput, compile time, memory: JAX vs torch
    'devices': devices,          # the same global batch on 1 vs N devices
    'seeds': seeds,              # k seeds in one run: what one more seed costs
    'conv_layers': conv_layers,  # one 3x3 convolution: XLA's Eigen and YNNPACK paths, torch
    'shake': shake,              # the Shake-Shake and ShakeDrop gates' cost
    'finetune': finetune,        # fine-tuning steps of a pretrained family, JAX vs torch
    'checkpoint': checkpoint,    # an epoch with synchronous and asynchronous checkpoints
    'startup': startup,          # whole processes: cold and warm compilation cache, torch
    'corruptions': corruptions,  # CIFAR-10-C generation, ours and the reference's
    'evaluation': evaluation,    # the eval at each TTA level (views), OOD scoring and the temperature fit
    'profile': profile,          # where a step's time goes: XLA's ops or oneDNN's calls
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  families = parser.add_subparsers(dest='family', required=True, metavar='FAMILY')
  parsers = {}
  for name, module in FAMILIES.items():
    summary = ' '.join(module.__doc__.split('\n\n')[0].split())  # the docstring's first paragraph
    parsers[name] = families.add_parser(name, help=summary, description=module.__doc__,
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
