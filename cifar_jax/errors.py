"""The errors a run reports as one line (cifar_jax/main.py maps each to an exit status)."""

import os
import re

# tensorstore, which writes orbax's checkpoints, reports the OS error of a failed write inside the text of
# a ValueError: `Failed to write 136894 bytes to file 4: No space left on device [os_error_code='28']`.
TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='?(\d+)")


class ConfigError(ValueError):
  """A config field with an invalid value; the message names the field and what would be valid."""


class DataError(ValueError):
  """The training data cannot be loaded; the message says what to fix (a path, a download, a format)."""


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


class WriteError(RuntimeError):
  """Writing a checkpoint or the metrics failed (no space, read-only, an I/O error); the last complete
  checkpoint is kept, so the same command resumes once the disk is fixed."""


def os_error(error: BaseException | None) -> OSError | None:
  """The OS error behind a failed write: `error` itself, one it was raised from, or the one tensorstore
  names in its message; None when the failure is not the operating system's (a bug, not a disk)."""
  while error is not None:
    if isinstance(error, OSError):
      return error
    match = TENSORSTORE_OS_ERROR.search(str(error))
    if match:
      code = int(match.group(1))
      return OSError(code, os.strerror(code))
    error = error.__cause__ or error.__context__
  return None


def write_error(what: str, where: str, error: BaseException, then: str = '') -> WriteError | None:
  """A one-line WriteError for a failed write of `what` to `where`, or None if `error` is no OS error."""
  cause = os_error(error)
  if cause is None:
    return None
  reason = cause.strerror or str(cause)
  return WriteError(f'writing {what} to {where} failed ({reason}){"; " + then if then else ""}')
