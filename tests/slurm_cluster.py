"""A one-node SLURM cluster for the tests: Debian's slurm-wlm and munge, installed when missing, each daemon
in the foreground as a child of this process (stopped by its pid), every file in one temporary folder.

  cluster = slurm_cluster.start(folder)   # munged, slurmctld, slurmd; returns once sinfo shows the node idle
  subprocess.run(['sbatch', ...], env=cluster.env)
  cluster.stop()

`cluster.env` is os.environ with SLURM_CONF naming this cluster's slurm.conf (the clients read it; jobs
inherit it). Its own munge key and socket, state and spool folders, and ports that were free at start.
"""

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time

PACKAGES = ('slurmctld', 'slurmd', 'slurm-client', 'munge')
DAEMONS = ('munged', 'slurmctld', 'slurmd')
PARTITION = 'debug'
CPUS = 2
START_TIMEOUT_S = 60

SLURM_CONF = '''\
ClusterName=cifarjax
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=60
SchedulerParameters=sched_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4096 State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP
'''


def missing_requirement() -> str | None:
  """Why a cluster cannot start here (installing the packages first when root and apt can), or None."""
  if all(shutil.which(d) or os.path.exists(f'/usr/sbin/{d}') for d in DAEMONS) and shutil.which('sbatch'):
    return None
  if os.geteuid() != 0 or not shutil.which('apt-get'):
    return 'SLURM is not installed and cannot be (needs root and apt-get: apt-get install ' + ' '.join(
        PACKAGES) + ')'
  env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
  for cmd in (['apt-get', 'update', '-qq'], ['apt-get', 'install', '-y', '-qq', *PACKAGES]):
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode:
      lines = (result.stderr or result.stdout).strip().splitlines() or ['no output']
      return f"{' '.join(cmd)} failed: {lines[-1]}"
  return None


def _free_ports(n: int) -> list[int]:
  with contextlib.ExitStack() as stack:
    socks = [stack.enter_context(socket.socket()) for _ in range(n)]
    for s in socks:
      s.bind(('', 0))
    return [s.getsockname()[1] for s in socks]


@dataclasses.dataclass
class Cluster:
  folder: str
  env: dict
  host: str
  partition: str = PARTITION
  procs: list = dataclasses.field(default_factory=list)

  def run(self, *cmd, check=True, **kwargs) -> subprocess.CompletedProcess:
    """A SLURM client command (sinfo, squeue, scontrol ...) against this cluster."""
    return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, check=check,
                          **kwargs)

  def node_state(self) -> str:
    result = self.run('sinfo', '-h', '-N', '-o', '%T', check=False)
    return result.stdout.strip() if result.returncode == 0 else ''

  def stop(self) -> None:
    """Stops the daemons this object started, by pid, newest first, and the jobs they still ran."""
    if self.procs and shutil.which('scancel'):
      self.run('scancel', '--full', '-u', 'root', check=False)  # root: this cluster's jobs are root's
    for proc in reversed(self.procs):
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
          proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
    self.procs.clear()

  def log_tail(self, name: str, lines: int = 20) -> str:
    path = os.path.join(self.folder, name)
    return ''.join(open(path).readlines()[-lines:]) if os.path.exists(path) else f'(no {name})'


def _daemon(path: str) -> str:
  return shutil.which(path) or f'/usr/sbin/{path}'


def start(folder: str, cpus: int = CPUS) -> Cluster:
  """munged, slurmctld and slurmd on this host with every file in `folder`; returns when the node is idle."""
  os.makedirs(folder, exist_ok=True)
  os.chmod(folder, 0o700)  # munged refuses a key or socket in a folder others can write to
  for sub in ('state', 'spool'):
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
  host = socket.gethostname().split('.')[0]
  ctld_port, slurmd_port = _free_ports(2)
  conf = os.path.join(folder, 'slurm.conf')
  with open(conf, 'w') as f:
    f.write(SLURM_CONF.format(host=host, folder=folder, ctld_port=ctld_port, slurmd_port=slurmd_port,
                              cpus=cpus, partition=PARTITION))
  key = os.path.join(folder, 'munge.key')
  with open(key, 'wb') as f:
    f.write(os.urandom(1024))
  os.chmod(key, 0o600)
  env = dict(os.environ, SLURM_CONF=conf)
  cluster = Cluster(folder=folder, env=env, host=host)
  log = open(os.path.join(folder, 'daemons.out'), 'ab')
  commands = [
      [_daemon('munged'), '--foreground', '--force', f'--socket={folder}/munge.socket', f'--key-file={key}',
       f'--pid-file={folder}/munged.pid', f'--log-file={folder}/munged.log',
       f'--seed-file={folder}/munged.seed'],
      [_daemon('slurmctld'), '-D', '-i', '-f', conf],
      [_daemon('slurmd'), '-D', '-f', conf],
  ]
  try:
    for cmd in commands:
      # nice: the jobs slurmd starts inherit its priority, so they yield to interactive work.
      cluster.procs.append(subprocess.Popen(['nice', '-n', '10', *cmd], env=env, stdout=log, stderr=log,
                                            start_new_session=True))
      if cmd[0].endswith('munged'):
        _wait_for(lambda: os.path.exists(f'{folder}/munge.socket'), 'munged', cluster)
    _wait_for(lambda: cluster.node_state() == 'idle', 'the node to be idle', cluster)
  except BaseException:
    cluster.stop()
    raise
  return cluster


def _wait_for(ready, what: str, cluster: Cluster) -> None:
  deadline = time.monotonic() + START_TIMEOUT_S
  while not ready():
    dead = [p.args for p in cluster.procs if p.poll() is not None]
    if dead or time.monotonic() > deadline:
      raise RuntimeError(f'waiting for {what}: {"exited: " + str(dead) if dead else "timed out"}\n'
                         f"{cluster.log_tail('slurmctld.log')}{cluster.log_tail('slurmd.log')}"
                         f"{cluster.log_tail('daemons.out')}")
    time.sleep(0.5)
