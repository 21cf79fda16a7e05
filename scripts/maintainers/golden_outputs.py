"""Golden outputs of tiny training runs: hashes that a refactor of the trainer must leave bitwise unchanged.

  python scripts/maintainers/golden_outputs.py --out=/tmp/golden_before.json      # on the old tree
  python scripts/maintainers/golden_outputs.py --out=/tmp/golden_after.json --compare=/tmp/golden_before.json

Each case trains configs/tiny.py (ResNet9 at width 1/8 on 200 synthetic images) in a
subprocess of its own, with the device count it needs, through the public `train.train_and_evaluate`, and
records sha256 hashes of the final step, params, optimizer state, BatchNorm statistics, SWA average and of
`metrics.jsonl` without its timing keys. Hashes are of float bits, so they compare only runs on the same
machine (the CPU's instruction set picks the kernels); `--fixture=DIR` also writes a checkpoint of the
default case cut at step 6 (mid epoch 2), and the `fixture_resume` case resumes one such folder.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EIGEN_CONVOLUTIONS = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
FIXTURE_STEP = 6
CASES = {  # name: (device count, config changes)
    'default': (1, {}),
    'swa_per_epoch': (1, {'num_epochs': 3, 'swa.enabled': True, 'swa.start_epoch': 1,
                          'swa.eval_every_epoch': True}),
    'swa_per_step': (1, {'num_epochs': 3, 'swa.enabled': True, 'swa.start_epoch': 1,
                         'swa.update_every_steps': 3}),
    'plateau': (1, {'num_epochs': 3, 'schedule.name': 'plateau', 'schedule.patience': 0}),
    'seeds_2': (1, {'num_seeds': 2, 'num_epochs': 3, 'swa.enabled': True, 'swa.start_epoch': 1}),
    'jit_4_devices': (4, {'num_epochs': 3, 'swa.enabled': True, 'swa.start_epoch': 1}),
    'pmap_4_devices': (4, {'parallelism': 'pmap', 'num_epochs': 3, 'swa.enabled': True,
                           'swa.start_epoch': 1}),
    'fixture_resume': (1, {}),  # resumes --fixture; ends as 'default' does
}


def machine_fingerprint() -> str:
  """What the hashes depend on besides the code: the CPU (model and instruction set) and JAX's version."""
  import jax  # pylint: disable=g-import-not-at-top

  cpu = {}
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() in ('model name', 'flags') and key.strip() not in cpu:
          cpu[key.strip()] = value.strip()
  flags = hashlib.sha256(cpu.get('flags', '').encode()).hexdigest()[:12]
  return f"{cpu.get('model name', 'unknown cpu')}; flags {flags}; jax {jax.__version__}"


def make_config(changes: dict):
  """configs/tiny.py with a checkpoint every 3 steps, a log every 2, and `changes`."""
  sys.path.insert(0, ROOT)
  from configs import tiny  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  # XLA's BatchNorm, as every recorded case ran it (oneDNN's, the default since 2026-12-07, agrees with it
  # to float32 rounding, not to the bit: tests/test_onednn_conv.py compares the two).
  config.model.batch_norm = 'xla'
  config.checkpoint_every_steps = 3
  config.log_every_steps = 2
  config.keep_checkpoints = 10
  for name, value in changes.items():
    *parents, leaf = name.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _digest(value) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(value)):
    x = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((x.dtype, x.shape)).encode())
    h.update(x.tobytes())
  return h.hexdigest()


def added_after_golden(key: str) -> bool:
  """Metric keys added after the hashes were recorded (issue 17's calibration and ensemble metrics)."""
  return (key.startswith(('ensemble_', 'swa_ensemble_', 'swag_', 'multiswag_'))
          or re.search(r'_(ece|brier)(_mean|_std|_per_seed)?$', key) is not None)


def metrics_digest(workdir: str) -> tuple[str, list]:
  from cifar_jax import metrics_writer  # pylint: disable=g-import-not-at-top

  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [{k: v for k, v in json.loads(line).items()
                if k not in metrics_writer.TIMING_KEYS and not added_after_golden(k)}
               for line in f if line.strip()]
  return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest(), records


def run_case(name: str, workdir: str, fixture: str | None) -> dict:
  """Trains case `name` into `workdir` (in this process); returns its hashes."""
  from cifar_jax import train  # pylint: disable=g-import-not-at-top

  config = make_config(CASES[name][1])
  if name == 'fixture_resume':
    shutil.copytree(fixture, workdir)
  state = train.train_and_evaluate(config, workdir)
  out = {field: _digest(getattr(state, field)) for field in
         ('step', 'params', 'batch_stats', 'opt_state', 'swa_params', 'swa_batch_stats', 'swa_count')}
  out['metrics'], out['metrics_records'] = metrics_digest(workdir)
  return out


def write_fixture(workdir: str, fixture: str) -> None:
  """The default case's workdir cut back to its checkpoint at FIXTURE_STEP (as a kill there leaves it)."""
  shutil.copytree(workdir, fixture)
  checkpoints = os.path.join(fixture, 'checkpoints')
  for step in os.listdir(checkpoints):
    if step.isdigit() and int(step) != FIXTURE_STEP:
      shutil.rmtree(os.path.join(checkpoints, step))
  shutil.rmtree(os.path.join(fixture, 'tensorboard'), ignore_errors=True)


def _subprocess(name: str, workdir: str, fixture: str | None) -> dict:
  devices = CASES[name][0]
  flags = EIGEN_CONVOLUTIONS + (f' --xla_force_host_platform_device_count={devices}' if devices > 1 else '')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  out = os.path.join(workdir + '.json')
  cmd = [sys.executable, os.path.abspath(__file__), f'--case={name}', f'--workdir={workdir}',
         f'--case_out={out}'] + ([f'--fixture={fixture}'] if fixture else [])
  subprocess.run(cmd, env=env, check=True)
  with open(out) as f:
    return json.load(f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', help='where to write the hashes (JSON)')
  parser.add_argument('--compare', help='hashes written by an earlier run to compare with')
  parser.add_argument('--fixture', help='write (or, for fixture_resume, read) the step-6 checkpoint here')
  parser.add_argument('--cases', default=','.join(CASES), help='comma-separated cases')
  parser.add_argument('--case', help=argparse.SUPPRESS)
  parser.add_argument('--workdir', help=argparse.SUPPRESS)
  parser.add_argument('--case_out', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.case:  # a subprocess
    result = run_case(args.case, args.workdir, args.fixture)
    with open(args.case_out, 'w') as f:
      json.dump(result, f)
    return
  tmp = tempfile.mkdtemp(prefix='golden_')
  results = {}
  for name in args.cases.split(','):
    if name == 'fixture_resume' and not (args.fixture and os.path.isdir(args.fixture)):
      continue
    results[name] = _subprocess(name, os.path.join(tmp, name), args.fixture)
    if name == 'default' and args.fixture and not os.path.exists(args.fixture):
      write_fixture(os.path.join(tmp, name), args.fixture)
    print(name, 'done', flush=True)
  if 'fixture_resume' in results and 'default' in results:
    resumed, default = results['fixture_resume'], results['default']
    print('fixture_resume ends as default:',
          all(resumed[k] == default[k] for k in default if k != 'metrics_records'))
  results['machine'] = machine_fingerprint()
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)
  if args.compare:
    with open(args.compare) as f:
      before = json.load(f)
    if before.get('machine', results['machine']) != results['machine']:
      print(f"recorded on another machine ({before['machine']}); float bits may differ")
    differ = [f'{case}.{key}' for case in results if case in before and case != 'machine'
              for key in results[case] if key != 'metrics_records'
              and results[case][key] != before[case].get(key)]
    print('bitwise equal' if not differ else f'DIFFER: {differ}')
    sys.exit(1 if differ else 0)
  shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
