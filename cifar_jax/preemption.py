"""SIGTERM and Ctrl-C: finish the current step, write a checkpoint, and stop with a message on resuming."""

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped on a signal after checkpointing `step`; the same command resumes it."""

  def __init__(self, signum: int, step: int, workdir: str):
    self.signum, self.step, self.workdir = signum, step, workdir
    super().__init__(
        f'stopped by {signal.Signals(signum).name} at step {step}; a checkpoint is in '
        f'{workdir}/checkpoints: run the same command to resume')


class StopRequest:
  """A context manager that turns SIGTERM / SIGINT into a flag the train loop checks between steps.

  A second signal of the same kind while the first is pending stops at once (the default action).
  Outside the main thread (where Python cannot install handlers) it does nothing.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    if self.signum == signum:  # asked twice: stop now
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      signal.raise_signal(signum)
      return
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handler)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()
    return False
