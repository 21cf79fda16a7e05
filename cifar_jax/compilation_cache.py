"""JAX's persistent compilation cache, on by default: a run whose programs were compiled before loads them.

`config.compilation_cache`: 'auto' is `$XDG_CACHE_HOME/cifar_jax/jax` (`~/.cache/cifar_jax/jax`) unless
JAX_COMPILATION_CACHE_DIR names another folder; a path is that folder; '' turns the cache off. JAX keys
each entry by the program's HLO, the compile options, the devices and the JAX and jaxlib versions, so a
changed model, batch size or JAX never loads a stale program; the oneDNN custom calls carry the hash of
their library in their names (`onednn_conv.load`, which registers them before anything compiles). On a
GPU the cache also keeps XLA's autotuning results (jax_persistent_cache_enable_xla_caches). Clearing it is
`rm -rf ~/.cache/cifar_jax/jax`.
"""

import os

from absl import logging
import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

AUTO = 'auto'
ENV_CACHE_DIR = 'JAX_COMPILATION_CACHE_DIR'


def default_dir() -> str:
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'cifar_jax', 'jax')


def cache_dir(setting: str) -> str | None:
  """The folder `config.compilation_cache` names, or None (off)."""
  if setting == AUTO:
    return os.environ.get(ENV_CACHE_DIR) or default_dir()
  return os.path.expanduser(setting) or None


def configure(setting: str) -> str | None:
  """Points JAX's persistent cache at `cache_dir(setting)` (or turns it off); returns the folder.

  Every program is cached however fast it compiled (JAX's default skips those under a second), so a
  second run compiles nothing; JAX reads the setting at each compile, so this works until the first one
  and after it (the cache is reset when the folder changes).
  """
  path = cache_dir(setting)
  enabled = path is not None
  if (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir) == (enabled, path):
    return path
  jax.config.update('jax_enable_compilation_cache', enabled)
  jax.config.update('jax_compilation_cache_dir', path)
  if enabled:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:  # a read-only home: run without the cache rather than fail
      logging.warning('Compilation cache off: cannot create %s (%s).', path, e.strerror)
      jax.config.update('jax_enable_compilation_cache', False)
      path = None
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  jax_cache.reset_cache()
  return path
