"""One writer per workdir: a training run's process 0 holds an operating-system lock on `workdir/lock`.

The lock is `flock`'s, on an open file, not the file's existence: the kernel releases it when the process
ends however it ends (SIGKILL, a crash; a reboot forgets it), so a lock left by a dead run is simply taken
by the next one, without a flag. The file holds one JSON line saying who holds it (host, pid, since) for the
error a second run prints; the line is cleared on release, so a line found while the lock is free belongs
to a run that died holding it, and the new run says that it takes over. `--mode=evaluate` and
`--mode=export` only read, and take no lock.
"""

import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging

from cifar_jax.errors import ConfigError

LOCK_FILE = 'lock'


def _describe(line: str) -> str:
  """'pid 123 on host h since 2026-11-30 08:46:00 UTC' from a holder line, or what can be said."""
  try:
    holder = json.loads(line)
    return f'pid {holder["pid"]} on host {holder["host"]} since {holder["since"]}'
  except (ValueError, TypeError, KeyError):
    return 'holder unknown: it is starting or wrote no holder line'


def _read(fd: int) -> str:
  return os.pread(fd, 4096, 0).decode('utf-8', 'replace').strip()


def _in_use(workdir: str, holder: str) -> ConfigError:
  return ConfigError(
      f'--workdir={workdir} is in use by another run ({holder}); wait for it to end or stop it, '
      'or give another --workdir')


def check_free(workdir: str) -> None:
  """Raises `WorkdirLock`'s ConfigError at once when a live run holds `workdir`; writes nothing.

  For the start of a run, before its data and weights are read: the lock itself is taken later (by
  `WorkdirLock`), so a run that starts in between is still refused there.
  """
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR)
  except OSError:  # no lock file yet (or not ours to open): nothing holds it
    return
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
  except BlockingIOError:
    raise _in_use(workdir, _describe(_read(fd))) from None
  except OSError:
    pass  # a file system without locks: WorkdirLock says so
  finally:
    os.close(fd)


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir's lock (when `hold`), or raises ConfigError naming the
  live run that holds it."""

  def __init__(self, workdir: str, hold: bool = True):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.workdir, self.hold = workdir, hold
    self._fd = None

  def __enter__(self):
    if not self.hold:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe(_read(fd))
      os.close(fd)
      raise _in_use(self.workdir, holder) from None
    except OSError as e:  # a file system without locks (some network mounts): run unguarded
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        os.close(fd)
        raise
      logging.warning('%s: the file system does not lock files (%s); nothing stops a second run on this '
                      'workdir.', self.path, e.strerror)
      return self
    self._fd = fd
    previous = _read(fd)
    if previous:
      logging.warning('%s: the run that held this workdir (%s) ended without releasing it (killed?); '
                      'taking it over.', self.workdir, _describe(previous))
    since = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
    line = json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'since': since}) + '\n'
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, line.encode(), 0)
    except OSError as e:  # a full disk: the lock holds all the same, only the holder line is missing
      logging.warning('%s: cannot write the holder line (%s).', self.path, e.strerror)
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      try:
        os.ftruncate(self._fd, 0)  # a clean end: no holder line left behind
      except OSError:
        pass  # the lock itself goes with the file descriptor
      os.close(self._fd)  # releases the flock
      self._fd = None
    return False
