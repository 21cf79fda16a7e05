"""Sweeps and multi-process training on a real one-node SLURM cluster (tests/slurm_cluster.py: Debian's
slurm-wlm and munge, installed when missing, started here and stopped by pid), and the one-line errors.

The cluster's tests are slow (`make test-slow`): each trains several tiny runs through sbatch and srun.
Every run pins its threads (one OpenMP thread, XLA's single-threaded Eigen) on both sides of a comparison,
since the CPU convolutions' rounding depends on the thread count.
"""

import json
import os
import pickle
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import slurm_cluster  # pylint: disable=g-import-not-at-top,wrong-import-position

from cifar_jax import cluster  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position

PINNED = {'JAX_PLATFORMS': 'cpu', 'OMP_NUM_THREADS': '1', 'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false'}
TINY = ['--set=num_epochs=2', '--set=model.width_multiplier=0.125', '--set=data.synthetic_train_size=128',
        '--set=data.synthetic_eval_size=64', '--set=progress_bar=False']
TIMING_KEYS = ('images_per_second',)  # and every *_seconds field: what differs between equal runs
COSINE = '''"""Smoke with a cosine schedule. Blog: 93.91 % (not this run's figure: a test value)."""
from configs import smoke


def get_config():
  config = smoke.get_config()
  config.schedule.name = 'cosine'
  return config
'''
MISSING_DATA = '''"""Smoke on a data file that does not exist: the task fails when it loads the data."""
from configs import smoke


def get_config():
  config = smoke.get_config()
  config.data.source = 'npz'
  config.data.path = '/nonexistent/cifar10_train.npz'
  return config
'''


@pytest.fixture(scope='session')
def slurm(tmp_path_factory):
  """A one-node cluster for the session; skipped with its reason where SLURM cannot be installed."""
  reason = slurm_cluster.missing_requirement()
  if reason:
    pytest.skip(reason)
  cluster = slurm_cluster.start(str(tmp_path_factory.mktemp('slurm')))
  yield cluster
  cluster.stop()


def _env(cluster=None, **extra) -> dict:
  return dict(cluster.env if cluster else os.environ, **PINNED, **extra)


def _sweep(env, workdir, configs, *extra, timeout=600) -> subprocess.CompletedProcess:
  cmd = [sys.executable, 'scripts/sweep.py', f"--configs={','.join(map(str, configs))}",
         f'--workdir={workdir}', *TINY, *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                        check=False)


def _rows(workdir) -> list[list[str]]:
  """sweep.md's table rows, cells without the wall time."""
  lines = open(os.path.join(workdir, 'sweep.md')).read().splitlines()
  return [line.split(' | ')[:-1] for line in lines if line.startswith('| ') and not line.startswith(
      ('| config', '| ---'))]


def _records(workdir) -> list[dict]:
  """metrics.jsonl without the timings."""
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS and not k.endswith('_seconds')}
          for r in records]


def _submissions(workdir) -> list[dict]:
  path = os.path.join(workdir, 'submitit', 'submissions.jsonl')
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _wait_until(predicate, what: str, timeout: float = 300):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.5)


# The cluster ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_array_equals_inline_and_submits_nothing_twice(slurm, tmp_path):
  """2 configs x 2 seeds as one job array: a second command while it runs submits nothing, --train=False
  marks the unfinished rows, --wait tabulates what `--executor=inline` tabulates, metrics bitwise."""
  (tmp_path / 'cosine.py').write_text(COSINE)
  configs = ['configs/smoke.py', tmp_path / 'cosine.py']
  env = _env(slurm)
  workdir = tmp_path / 'array'
  slurm_flags = ['--executor=slurm', '--seeds=2', '--slurm_cpus_per_task=1']
  result = _sweep(env, workdir, configs, *slurm_flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Submitted 2 run(s) as job array' in result.stdout and 'squeue -j' in result.stdout
  first = _submissions(workdir)
  assert len(first) == 2 and len({s['job_id'].split('_')[0] for s in first}) == 1
  # Again while the array is queued or running: nothing submitted, the table marks both rows.
  result = _sweep(env, workdir, configs, *slurm_flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count('not submitted again') == 2, result.stdout
  assert _submissions(workdir) == first
  queued = slurm.run('squeue', '-h', '-r', '-o', '%i').stdout.split()
  assert sorted(queued) == sorted(s['job_id'] for s in first)
  for row in _rows(workdir):
    assert 'queued' in ' '.join(row) or 'running' in ' '.join(row), row
  result = _sweep(env, workdir, configs, *slurm_flags, '--wait')
  assert result.returncode == 0, result.stderr[-3000:]
  assert _submissions(workdir) == first

  inline = tmp_path / 'inline'
  result = _sweep(_env(), inline, configs, '--seeds=2')
  assert result.returncode == 0, result.stderr[-3000:]
  assert _rows(workdir) == _rows(inline) and len(_rows(inline)) == 2
  for name in ('smoke', 'cosine'):
    assert _records(workdir / name) == _records(inline / name)
  assert 'finished, kept' in _sweep(env, workdir, configs, *slurm_flags).stdout


@pytest.mark.slow
@pytest.mark.parametrize('interrupt', ['scontrol_requeue', 'usr2'])
def test_requeued_task_resumes_bitwise(slurm, tmp_path, interrupt):
  """Mid-run, `scontrol requeue` (SIGTERM, then SLURM starts the batch script again) or submitit's SIGUSR2
  (a time limit or preemption: the task checkpoints and requeues itself): the trainer checkpoints the
  current step, SLURM starts the task again, it resumes from that checkpoint and ends with the metrics of
  an uninterrupted run."""
  longer = ['--seeds=1', '--set=num_epochs=6', '--set=data.synthetic_train_size=256']
  env = _env(slurm)
  workdir = tmp_path / 'requeued'
  result = _sweep(env, workdir, ['configs/smoke.py'], '--executor=slurm', *longer)
  assert result.returncode == 0, result.stderr[-3000:]
  job_id = _submissions(workdir)[0]['job_id']
  metrics = workdir / 'smoke' / 'metrics.jsonl'
  _wait_until(lambda: metrics.exists() and metrics.read_text().count('\n') >= 1, 'the first epoch')
  if interrupt == 'usr2':
    slurm.run('scancel', '--signal=USR2', job_id)  # what `#SBATCH --signal=USR2@90` sends before the limit
  else:
    slurm.run('scontrol', 'requeue', job_id)
  log = workdir / 'submitit' / f'{job_id}_0_log.err'
  _wait_until(lambda: 'stopped by SIGTERM' in log.read_text(), 'the checkpoint on SIGTERM', 120)
  # A requeued job waits (BeginTime) before SLURM starts it again; start it now.
  _wait_until(lambda: 'PENDING' in slurm.run('squeue', '-h', '-r', '-j', job_id, '-o', '%T').stdout,
              'the requeued job to be pending', 120)
  slurm.run('scontrol', 'update', f'JobId={job_id}', 'StartTime=now')
  result = _sweep(env, workdir, ['configs/smoke.py'], '--executor=slurm', '--wait', *longer)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(_submissions(workdir)) == 1  # the requeued job, never a second one
  out = (workdir / 'submitit' / f'{job_id}_0_log.out').read_text()
  assert out.count('Starting with') == 2, out  # submitit started the task twice
  assert 'Resuming from step' in log.read_text()
  if interrupt == 'usr2':  # submitit's handler requeued it, with TrainTask.checkpoint's call
    assert f'Requeued job {job_id}' in out + log.read_text()

  inline = tmp_path / 'inline'
  result = _sweep(_env(), inline, ['configs/smoke.py'], *longer)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _records(workdir / 'smoke') == _records(inline / 'smoke')
  assert _rows(workdir) == _rows(inline)


@pytest.mark.slow
def test_failed_task_is_reported_and_the_rest_finish(slurm, tmp_path):
  """A task whose data file does not exist fails: its row says so with the error line, the other run
  finishes; run again, the command submits the failed run again and keeps the finished one."""
  (tmp_path / 'missing_data.py').write_text(MISSING_DATA)
  configs = ['configs/smoke.py', tmp_path / 'missing_data.py']
  env = _env(slurm)
  workdir = tmp_path / 'failing'
  result = _sweep(env, workdir, configs, '--executor=slurm', '--seeds=1', '--wait')
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {row[0][2:]: row for row in _rows(workdir)}
  assert rows['smoke'][2] == '2' and ' ± ' in rows['smoke'][4]
  assert rows['missing_data'][4].startswith('failed: DataError: '), rows['missing_data']
  assert '/nonexistent/cifar10_train.npz' in rows['missing_data'][4]
  result = _sweep(env, workdir, configs, '--executor=slurm', '--seeds=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'smoke: finished, kept' in result.stdout
  assert 'failed (DataError: ' in result.stdout and 'submitting it again' in result.stdout
  submissions = _submissions(workdir)
  assert [s['run'] for s in submissions] == ['smoke', 'missing_data', 'missing_data']
  slurm.run('scancel', submissions[-1]['job_id'].split('_')[0])


@pytest.mark.slow
def test_srun_two_tasks_train_as_the_two_processes_of_explicit_flags(slurm, tmp_path):
  """`srun --ntasks=2 cifar-jax ...` joins 2 processes from SLURM's variables (no distributed flags) and
  trains what 2 processes given --config.distributed.* train."""
  args = ['--config=configs/smoke.py', '--config.num_epochs=1', '--config.data.synthetic_train_size=256',
          '--config.data.synthetic_eval_size=128', '--config.progress_bar=False']
  cifar_jax = os.path.join(os.path.dirname(sys.executable), 'cifar-jax')
  env = _env(slurm)
  srun = subprocess.run(['srun', '--ntasks=2', '--cpus-per-task=1', cifar_jax, *args,
                         f"--workdir={tmp_path / 'srun'}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert srun.returncode == 0, srun.stderr[-3000:]
  assert 'process 0/2' in srun.stderr and 'process 1/2' in srun.stderr, srun.stderr[-3000:]

  address = f'127.0.0.1:{slurm_cluster._free_ports(1)[0]}'  # pylint: disable=protected-access
  explicit = [f"--workdir={tmp_path / 'flags'}", f'--config.distributed.coordinator_address={address}',
              '--config.distributed.num_processes=2']
  procs = [subprocess.Popen([cifar_jax, *args, *explicit, f'--config.distributed.process_id={i}'], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in (0, 1)]
  outputs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:]
  assert _records(tmp_path / 'srun') == _records(tmp_path / 'flags')


@pytest.mark.slow
def test_unknown_partition_is_one_line(slurm, tmp_path):
  result = _sweep(_env(slurm), tmp_path / 'sweep', ['configs/smoke.py'], '--executor=slurm',
                  '--slurm_partition=nope')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      'sweep.py: error: --slurm_partition=nope: no such partition; this cluster has debug (sinfo)']
  assert not _submissions(tmp_path / 'sweep')
  assert slurm.run('squeue', '-h').stdout.strip() == ''


# Without a cluster ------------------------------------------------------------------------------------------


def test_no_sbatch_on_path_is_one_line(tmp_path):
  result = _sweep(_env(PATH=str(tmp_path)), tmp_path / 'sweep', ['configs/smoke.py'], '--executor=slurm')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      'sweep.py: error: --executor=slurm: no sbatch on PATH; run the sweep on a SLURM login node, or use '
      '--executor=local (local processes) or --executor=inline (one after another)']
  assert not (tmp_path / 'sweep' / 'smoke').exists()


def test_unwritable_workdir_is_one_line(tmp_path):
  (tmp_path / 'a_file').write_text('')
  workdir = tmp_path / 'a_file' / 'sweep'
  result = _sweep(_env(), workdir, ['configs/smoke.py'], '--executor=slurm')
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1
  assert lines[0].startswith(f'sweep.py: error: --workdir={workdir}: cannot write there (')


def test_partial_slurm_variables_are_one_line(monkeypatch):
  """An allocation's shell (jax-ml/jax#30073): SLURM_NTASKS without srun's per-task variables."""
  for name in parallel.SLURM_TASK_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  for name in (parallel.ENV_COORDINATOR_ADDRESS, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  config = sweep.load_config(os.path.join(ROOT, 'configs', 'smoke.py'))[0]
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert not parallel.initialize_distributed(config.distributed)  # one task: one process
  monkeypatch.setenv('SLURM_NTASKS', '2')
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  with pytest.raises(config_lib.ConfigError, match=r'^SLURM_NTASKS=2 but SLURM_STEP_NODELIST, SLURM_PROCID, '
                     r'SLURM_LOCALID not set: this process is not a task that srun started'):
    parallel.initialize_distributed(config.distributed)
  config.distributed.num_processes = 1  # the way out it names
  assert not parallel.initialize_distributed(config.distributed)


def test_partial_slurm_variables_stop_cifar_jax_in_one_line(tmp_path):
  env = _env(SLURM_NTASKS='2', SLURM_JOB_ID='7')
  for name in ('SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID'):
    env.pop(name, None)
  result = subprocess.run([sys.executable, '-m', 'cifar_jax.main', '--config=configs/smoke.py',
                           f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('cifar-jax: error: SLURM_NTASKS=2 but'), result.stderr
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_local_executor_trains_what_inline_trains(tmp_path):
  """--executor=local: submitit's local processes, one per run (here 2 seed chunks), waited for; the
  table and metrics are those of the inline sweep of the same runs."""
  flags = ['--seeds=2', '--seeds_per_task=1', '--set=num_epochs=1']
  result = _sweep(_env(), tmp_path / 'local', ['configs/smoke.py'], '--executor=local', *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert [s['run'] for s in _submissions(tmp_path / 'local')] == ['smoke/seeds_0-0', 'smoke/seeds_1-1']
  result = _sweep(_env(), tmp_path / 'inline', ['configs/smoke.py'], *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _rows(tmp_path / 'local') == _rows(tmp_path / 'inline')
  assert _rows(tmp_path / 'local')[0][2:4] == ['1', '2']  # one epoch, both seeds in one row
  for chunk in ('seeds_0-0', 'seeds_1-1'):
    assert _records(tmp_path / 'local' / 'smoke' / chunk) == _records(tmp_path / 'inline' / 'smoke' / chunk)


def test_run_states_from_metrics_ledger_and_results(tmp_path):
  """What a rerun decides from: the metrics (finished), the ledger and a live process (running), and
  submitit's result of a job that ended (failed with its error line, or stopped)."""
  config = sweep.load_config(os.path.join(ROOT, 'configs', 'smoke.py'))[0]  # num_epochs=2
  runs = {name: cluster.Run(name, str(tmp_path / name), config)
          for name in ('done', 'alive', 'failed', 'stopped', 'killed', 'new')}
  for name, epochs in (('done', 2), ('stopped', 1)):
    os.makedirs(runs[name].workdir)
    with open(os.path.join(runs[name].workdir, 'metrics.jsonl'), 'w') as f:
      for epoch in range(1, epochs + 1):
        f.write(json.dumps({'epoch': epoch}) + '\n')
  os.makedirs(tmp_path / 'submitit')
  pid_max = int(open('/proc/sys/kernel/pid_max').read())
  jobs = {'alive': str(os.getpid()), 'failed': str(pid_max - 1), 'stopped': str(pid_max - 2),
          'killed': str(pid_max - 3)}  # local jobs' ids are pids: the last three are no process's
  with open(tmp_path / 'submitit' / 'submissions.jsonl', 'w') as f:
    for name, job_id in jobs.items():
      f.write(json.dumps({'run': name, 'job_id': job_id, 'executor': 'local'}) + '\n')
  folder = tmp_path / 'submitit'
  traceback = ('Traceback (most recent call last):\n  ...\n'
               'cifar_jax.errors.DataError: data.path=/x: no such file')
  with open(folder / f"{jobs['failed']}_0_result.pkl", 'wb') as f:
    pickle.dump(('error', traceback), f)
  with open(folder / f"{jobs['stopped']}_0_result.pkl", 'wb') as f:
    pickle.dump(('success', 'stopped'), f)
  (folder / f"{jobs['killed']}_0_log.err").write_text('step 3\nKilled\n')
  states = cluster.run_states(list(runs.values()), str(tmp_path))
  got = {name: (states[run.workdir].status, states[run.workdir].error) for name, run in runs.items()}
  assert got['done'] == ('finished', '') and got['new'] == ('not run', '')
  assert got['alive'] == ('running', '')
  assert got['failed'] == ('failed', 'DataError: data.path=/x: no such file')
  assert got['stopped'] == ('stopped', '') and states[runs['stopped'].workdir].epochs == 1
  assert got['killed'][0] == 'failed'
  assert got['killed'][1].startswith('ended without a result (killed?): Killed; log: ')
  assert sweep.row_status([states[runs['done'].workdir], states[runs['failed'].workdir]]) == (
      'failed: DataError: data.path=/x: no such file; 1 of 2 runs finished')


def test_seed_chunks_train_the_seeds_of_one_run(tmp_path):
  """--seeds_per_task: runs of m seeds that together train seeds seed .. seed + k - 1 on the same data."""
  assert sweep.seed_chunks(5, 2) == [(0, 2), (2, 2), (4, 1)]
  assert sweep.seed_chunks(3, 0) == sweep.seed_chunks(3, 3) == sweep.seed_chunks(3, 5) == [(0, 3)]
  config = sweep.load_config(os.path.join(ROOT, 'configs', 'smoke.py'))[0]
  config.seed = 10
  runs = sweep.config_runs('smoke', config, 5, 2, str(tmp_path))
  assert [os.path.relpath(r.workdir, tmp_path) for r in runs] == [
      'smoke/seeds_10-11', 'smoke/seeds_12-13', 'smoke/seeds_14-14']
  assert [(r.config.seed, r.config.num_seeds) for r in runs] == [(10, 2), (12, 2), (14, 1)]
  assert {r.config.data.synthetic_seed for r in runs} == {10}  # the images of seed 10's run, in each
  one = sweep.config_runs('smoke', config, 5, 0, str(tmp_path))
  assert [(os.path.relpath(r.workdir, tmp_path), r.config.num_seeds) for r in one] == [('smoke', 5)]
