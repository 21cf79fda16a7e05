"""The errors a run reports as one line (cifar_jax/main.py maps each to an exit status)."""


class ConfigError(ValueError):
  """A config field with an invalid value; the message names the field and what would be valid."""


class DataError(ValueError):
  """The training data cannot be loaded; the message says what to fix (a path, a download, a format)."""


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""
