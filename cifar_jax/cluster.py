"""A sweep's runs as one submitit job array: on SLURM (`sbatch`), or as local processes (`cluster='local'`).

Each run (one config's k seeds, or a chunk of them, in its own workdir) is one array task, which calls
`TrainTask(run)`: `train.train_and_evaluate` in the task's process, resuming from the workdir's last
checkpoint whenever the task starts again. submitit's job folder is `<sweep workdir>/submitit`; its
`submissions.jsonl` says which job trains which workdir, so that the sweep, run again, asks SLURM (`squeue`:
queued or running) and the job folder (submitit's result of a task that ended) what became of each run
rather than submitting it twice (`run_states`).

Preemption, time limits and requeues, all resumed from the checkpoint:

- SIGUSR2, submitit's signal (`#SBATCH --signal=USR2@90`: 90 s before the time limit, and on preemption
  where the cluster sends it): the trainer checkpoints the current step and stops, then submitit's handler
  requeues the job with `TrainTask.checkpoint`'s call (submitit.helpers.Checkpointable: the same call).
- SIGTERM (`scontrol requeue`, a preemption that requeues, `scancel`): the trainer checkpoints the current
  step and the task exits without a result; SLURM starts the batch script again from its first line, and
  the same call resumes. A signal that comes before the training loop (start-up, compilation) loses no step.
"""

import contextlib
import dataclasses
import fcntl
import getpass
import json
import logging as pylogging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time

from absl import logging
import ml_collections
import submitit
from submitit.core import utils as submitit_utils

from cifar_jax import cpu_backend
from cifar_jax import metrics_writer
from cifar_jax import parallel
from cifar_jax import preemption
from cifar_jax import train
from cifar_jax.errors import ConfigError

EXECUTORS = ('slurm', 'local')
JOB_FOLDER = 'submitit'  # inside the sweep's workdir
SUBMISSIONS_FILE = 'submissions.jsonl'
JOB_NAME = 'cifar-jax-sweep'
POLL_SECONDS = 10.0
SQUEUE_TIMEOUT_S = 60
# squeue's states of a job that SLURM will still run (or is running); any other: the job has ended.
QUEUED = ('PENDING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'RESV_DEL_HOLD', 'SPECIAL_EXIT',
          'CONFIGURING', 'RESIZING', 'SIGNALING', 'STAGE_OUT')
RUNNING = ('RUNNING', 'COMPLETING', 'SUSPENDED', 'STOPPED')
# What a run can be: submit again the last three.
STATES = ('finished', 'queued', 'running', 'failed', 'stopped', 'not run')
RESUBMIT = ('failed', 'stopped', 'not run')


@dataclasses.dataclass
class Run:
  """One training run of a sweep: `config` (overrides, seed and num_seeds applied) trained in `workdir`."""
  name: str  # the table's row: the config file's name
  workdir: str
  config: ml_collections.ConfigDict


@dataclasses.dataclass
class SlurmOptions:
  """What each array task asks SLURM for (0 / None: the cluster's default)."""
  partition: str | None = None
  timeout_min: int = 24 * 60
  gpus_per_task: int = 0
  cpus_per_task: int = 0
  mem_gb: float = 0.0
  array_parallelism: int = 0  # tasks running at once; 0: all
  sbatch: tuple = ()  # more #SBATCH options: 'account=abc', 'qos=high', 'constraint=a100', 'exclusive'
  setup: tuple = ()  # shell lines of the batch script before the task starts ('module load cuda')


@dataclasses.dataclass
class State:
  """What became of a run: one of STATES, the job that trains it (if any) and, failed, the error line."""
  status: str
  job_id: str = ''
  error: str = ''
  epochs: int = 0  # epochs with metrics in the workdir


# The task -------------------------------------------------------------------------------------------------


class TrainTask(submitit.helpers.Checkpointable):
  """One run in one array task; Checkpointable: submitit requeues the same call on SIGUSR2 (timeout or
  preemption), and the call resumes from the workdir's checkpoint."""

  def __call__(self, run: Run) -> str:
    logging.set_verbosity(logging.INFO)
    pylogging.getLogger('absl').addFilter(_quiet_checkpointer)
    cpu_backend.configure(run.config)  # before JAX starts, as cifar-jax does
    parallel.initialize_distributed(run.config.distributed)  # a job of several tasks: one run
    with _Usr2StopsTraining() as usr2:
      try:
        train.train_and_evaluate(run.config, run.workdir)
      except preemption.Preempted as e:
        print(f'cifar-jax: {e}', file=sys.stderr, flush=True)
        if usr2.received:
          usr2.requeue()  # submitit's handler: dumps self.checkpoint(run), scontrol requeue, exits
        raise SystemExit(128 + e.signum) from None  # no result: the requeued task runs this call again
    return run.workdir


def _quiet_checkpointer(record) -> bool:
  """Leaves orbax's INFO lines (a dozen a checkpoint) out of the task's log, as cifar-jax does."""
  return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


class _Usr2StopsTraining:
  """SIGUSR2 while the training loop runs becomes the SIGTERM that the loop turns into a checkpoint and a
  stop; before the loop (nothing to save) it goes straight to the handler it replaced (submitit's)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def _handler(self, signum, frame):
    del frame
    self.received = True
    stop_request = getattr(signal.getsignal(signal.SIGTERM), '__self__', None)
    if isinstance(stop_request, preemption.StopRequest):
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.requeue(signum)

  def requeue(self, signum: int = signal.SIGUSR2) -> None:
    if callable(self._previous):
      self._previous(signum, None)
    sys.exit(128 + signum)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGUSR2, self._handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGUSR2, self._previous)
    return False


# Checks before anything is submitted ----------------------------------------------------------------------


def check_workdir(workdir: str) -> None:
  """Creates the sweep's workdir and writes in it, or one-line ConfigError."""
  try:
    os.makedirs(os.path.join(workdir, JOB_FOLDER), exist_ok=True)
    probe = os.path.join(workdir, JOB_FOLDER, f'.write_test_{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'--workdir={workdir}: cannot write there ({e.strerror or e}); give a folder you can '
                      'write to (on a cluster: one the compute nodes see too)') from e


def check_slurm(options: SlurmOptions, env: dict | None = None) -> None:
  """sbatch is on PATH and the partition exists (`sinfo`), or one-line ConfigError."""
  env = env or os.environ
  if shutil.which('sbatch', path=env.get('PATH')) is None:
    raise ConfigError('--executor=slurm: no sbatch on PATH; run the sweep on a SLURM login node, or use '
                      '--executor=local (local processes) or --executor=inline (one after another)')
  result = _slurm_command(['sinfo', '-h', '-o', '%R'], env)
  partitions = sorted(set(result.split()))
  if options.partition and options.partition not in partitions:
    raise ConfigError(f'--slurm_partition={options.partition}: no such partition; this cluster has '
                      f"{', '.join(partitions) or 'none'} (sinfo)")


def _slurm_command(cmd: list[str], env=None) -> str:
  """The stdout of a SLURM client command, or one-line ConfigError with its error."""
  try:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S,
                            check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise ConfigError(f'{cmd[0]}: {e}') from e
  if result.returncode:
    lines = (result.stderr or result.stdout).strip().splitlines() or [f'exit status {result.returncode}']
    raise ConfigError(f"{' '.join(cmd)}: {lines[-1]}")
  return result.stdout


# What became of each run ------------------------------------------------------------------------------------


def job_folder(workdir: str) -> str:
  return os.path.join(workdir, JOB_FOLDER)


def read_submissions(workdir: str) -> dict[str, dict]:
  """The last submission of each run's workdir (relative to the sweep's): {'job_id', 'executor', ...}."""
  path = os.path.join(job_folder(workdir), SUBMISSIONS_FILE)
  last = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          record = json.loads(line)
          last[record['run']] = record
  return last


def slurm_job_states(env=None) -> dict[str, str]:
  """squeue's state of each of this user's jobs still queued or running, one entry per array task."""
  if shutil.which('squeue', path=(env or os.environ).get('PATH')) is None:
    return {}
  out = _slurm_command(['squeue', '-u', getpass.getuser(), '-h', '-r', '-o', '%i|%T'], env)
  return dict(line.split('|', 1) for line in out.split() if '|' in line)


def _alive(pid: str) -> bool:
  try:
    os.kill(int(pid), 0)
  except (OSError, ValueError):
    return False
  return True


def _finished_epochs(workdir: str) -> int:
  records = metrics_writer.read_metrics(workdir) if os.path.isdir(workdir) else []
  return records[-1]['epoch'] if records else 0


def _ended_job(folder: str, job_id: str) -> tuple[str, str]:
  """A job no longer queued or running: ('failed', its error line) or ('stopped', '') from its result."""
  paths = submitit_utils.JobPaths(folder, job_id=job_id, task_id=0)
  if paths.result_pickle.exists():
    with open(paths.result_pickle, 'rb') as f:
      outcome, value = pickle.load(f)
    if outcome == 'success':
      return 'stopped', ''
    return 'failed', _error_line(str(value))
  last = _error_line(paths.stderr.read_text(errors='replace')) if paths.stderr.exists() else ''
  return 'failed', f'ended without a result (killed?){": " + last if last else ""}; log: {paths.stderr}'


def _error_line(text: str) -> str:
  """The last line of a traceback or log ('DataError: ...'), without the exception's module path."""
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  if not lines:
    return ''
  line = lines[-1]
  head, sep, rest = line.partition(': ')
  if sep and '.' in head and ' ' not in head:
    line = f"{head.rpartition('.')[2]}: {rest}"
  return line


def run_states(runs: list[Run], workdir: str, env=None) -> dict[str, State]:
  """Each run's State (by workdir): finished from its metrics; queued / running from squeue (SLURM) or its
  process (local); failed / stopped from submitit's result of the job that ended."""
  submissions = read_submissions(workdir)
  jobs = None
  states = {}
  for run in runs:
    epochs = _finished_epochs(run.workdir)
    if epochs >= run.config.num_epochs:
      states[run.workdir] = State('finished', epochs=epochs)
      continue
    record = submissions.get(os.path.relpath(run.workdir, workdir))
    if record is None:
      states[run.workdir] = State('stopped' if epochs else 'not run', epochs=epochs)
      continue
    job_id = record['job_id']
    if record['executor'] == 'slurm':
      jobs = slurm_job_states(env) if jobs is None else jobs
      live = jobs.get(job_id)
    else:
      live = 'RUNNING' if _alive(job_id) else None
    if live in RUNNING:
      states[run.workdir] = State('running', job_id, epochs=epochs)
    elif live is not None:
      states[run.workdir] = State('queued', job_id, epochs=epochs)
    else:
      status, error = _ended_job(job_folder(workdir), job_id)
      states[run.workdir] = State(status, job_id, error, epochs=epochs)
  return states


# Submitting and waiting -------------------------------------------------------------------------------------


@contextlib.contextmanager
def submission_lock(workdir: str):
  """One sweep command at a time decides what to submit in this workdir (flock; released on exit)."""
  with open(os.path.join(job_folder(workdir), 'lock'), 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _sbatch_option(text: str) -> tuple[str, object]:
  """'account=abc' or '--account=abc' -> ('account', 'abc'); 'exclusive' -> ('exclusive', True)."""
  name, sep, value = text.lstrip('-').partition('=')
  if not name:
    raise ConfigError(f'--slurm_sbatch={text}: expected an sbatch option such as account=abc or exclusive')
  return name, value if sep else True


def make_executor(executor: str, workdir: str, options: SlurmOptions) -> submitit.AutoExecutor:
  """submitit's executor for `executor` ('slurm' or 'local') with the job folder inside `workdir`."""
  ex = submitit.AutoExecutor(folder=job_folder(workdir), cluster=executor)
  params = {'name': JOB_NAME, 'timeout_min': options.timeout_min}
  if options.gpus_per_task:
    params['gpus_per_node'] = options.gpus_per_task  # one task per job: the node's share is the task's
  if options.cpus_per_task:
    params['cpus_per_task'] = options.cpus_per_task
  if options.mem_gb:
    params['mem_gb'] = options.mem_gb
  if executor == 'slurm':
    if options.partition:
      params['slurm_partition'] = options.partition
    if options.array_parallelism:
      params['slurm_array_parallelism'] = options.array_parallelism
    if options.sbatch:
      params['slurm_additional_parameters'] = dict(_sbatch_option(s) for s in options.sbatch)
    if options.setup:
      params['slurm_setup'] = list(options.setup)
  ex.update_parameters(**params)
  return ex


def submit(runs: list[Run], workdir: str, executor: str, options: SlurmOptions, env=None) -> list:
  """Submits, as one job array, every run that is neither finished nor queued or running; returns the jobs.

  Prints what it kept, what it submitted and how to follow it.
  """
  with submission_lock(workdir):
    states = run_states(runs, workdir, env)
    todo = [run for run in runs if states[run.workdir].status in RESUBMIT]
    for run in runs:
      state = states[run.workdir]
      if state.status in ('queued', 'running'):
        print(f'{run.workdir}: {state.status} as job {state.job_id}, not submitted again', flush=True)
      elif state.status == 'finished':
        print(f'{run.workdir}: finished, kept', flush=True)
      elif state.status == 'failed':
        print(f'{run.workdir}: job {state.job_id} failed ({state.error}); submitting it again', flush=True)
    if not todo:
      return []
    ex = make_executor(executor, workdir, options)
    try:
      jobs = ex.map_array(TrainTask(), todo)
    except submitit_utils.FailedJobError as e:  # sbatch refused it (an account, a limit): its last line
      raise ConfigError(f'sbatch refused the job array: {_error_line(str(e))}') from e
    with open(os.path.join(job_folder(workdir), SUBMISSIONS_FILE), 'a') as f:
      for run, job in zip(todo, jobs):
        f.write(json.dumps({'run': os.path.relpath(run.workdir, workdir), 'job_id': str(job.job_id),
                            'executor': executor, 'submitted': time.strftime('%Y-%m-%dT%H:%M:%S')}) + '\n')
  array_id = str(jobs[0].job_id).split('_')[0]
  folder = job_folder(workdir)
  for run, job in zip(todo, jobs):
    print(f'{run.workdir}: submitted as job {job.job_id}', flush=True)
  if executor == 'slurm':
    print(f'Submitted {len(jobs)} run(s) as job array {array_id}. Follow it with `squeue -j {array_id}`; '
          f'logs: {folder}/{array_id}_<task>_0_log.out and .err; the table so far: the same command with '
          '--train=False; wait for the end: the same command with --wait.', flush=True)
  return jobs


def wait(runs: list[Run], workdir: str, env=None, poll_seconds: float = POLL_SECONDS) -> dict[str, State]:
  """Blocks until no run of `runs` is queued or running; prints each change of state; returns the states."""
  last = {}
  while True:
    states = run_states(runs, workdir, env)
    for run in runs:
      state = states[run.workdir]
      if last.get(run.workdir) != (state.status, state.job_id):
        detail = f' ({state.error})' if state.error else ''
        print(f'{run.workdir}: {state.status}{" as job " + state.job_id if state.job_id else ""}{detail}',
              flush=True)
        last[run.workdir] = (state.status, state.job_id)
    if not any(s.status in ('queued', 'running') for s in states.values()):
      return states
    time.sleep(poll_seconds)
