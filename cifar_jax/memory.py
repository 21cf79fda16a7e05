"""The train step's memory, said before it is spent: the compiled step's plan (XLA's memory analysis)
against what the machine has, and the setting that would fit (`Program.compile` checks the first train
call before anything else compiles or runs).

XLA's plan of a compiled call: its arguments (the state, the dataset every device holds), its outputs
(less those that reuse a donated argument's buffer: `alias`), and one temporary buffer for everything in
between (the activations kept for the backward pass, the gradients), which XLA:CPU allocates whole at each
call. On the CPU every virtual device is the same host memory, so the plan counts once per device and is
compared with the host's MemAvailable; on a GPU, per device with what its allocator has left.
"""

import dataclasses
import math

from absl import logging
import jax

from cifar_jax.errors import ConfigError

GB = 1e9
MEMINFO = '/proc/meminfo'
# The share of the available memory a step may plan for: the plan leaves out the allocator's slack, the
# host's copies of metrics and checkpoints, and whatever else the machine starts meanwhile.
FIT_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """A compiled call's memory plan, in bytes per device, and how many devices share one memory."""

  temp: int
  arguments: int
  outputs: int
  alias: int
  code: int
  copies: int = 1  # devices whose plans add up in one memory (CPU devices: the host's)

  @property
  def peak(self) -> int:
    """The bytes the call needs at once: arguments, new outputs, temporaries, code (every copy)."""
    return self.copies * (self.temp + self.arguments + self.outputs - self.alias + self.code)

  def estimate(self, shrink: float, accumulators: int = 0) -> int:
    """`peak` with the temporaries (mostly activations) times `shrink`, a micro-batch `shrink` as large,
    plus `accumulators` bytes (per device) that accumulating gradients adds: about twice the params
    (the running sum and a micro-batch's gradients) when a step starts accumulating."""
    return (self.peak - self.copies * self.temp
            + int(math.ceil(self.copies * (self.temp * shrink + accumulators))))


def step_memory(compiled) -> StepMemory | None:
  """The memory plan of a compiled train call (jit's ahead-of-time executable), or None where XLA gives
  none (pmap's cached function, a backend without the analysis)."""
  try:
    stats = compiled.memory_analysis()
  except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  if stats is None:
    return None
  devices = jax.local_devices()
  copies = len(devices) if devices[0].platform == 'cpu' else 1
  return StepMemory(temp=stats.temp_size_in_bytes, arguments=stats.argument_size_in_bytes,
                    outputs=stats.output_size_in_bytes, alias=stats.alias_size_in_bytes,
                    code=stats.generated_code_size_in_bytes, copies=copies)


def available_bytes(device=None) -> tuple[int, str] | None:
  """(bytes free for a run, where the number comes from): the host's MemAvailable on the CPU (Linux), a
  GPU's allocator limit less what it holds; None where neither is known (the check is then skipped)."""
  device = device or jax.local_devices()[0]
  if device.platform == 'cpu':
    try:
      with open(MEMINFO) as f:
        for line in f:
          if line.startswith('MemAvailable:'):
            return int(line.split()[1]) * 1024, 'MemAvailable'
    except OSError:
      return None
    return None
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if not stats or 'bytes_limit' not in stats:
    return None
  return stats['bytes_limit'] - stats.get('bytes_in_use', 0), f'{device.platform} memory free'


def resident_bytes(arrays) -> int:
  """The bytes of `arrays` already placed (the dataset the step reads): the plan counts them, and the
  available memory already lacks them. On the CPU every device's copy (one host memory), else one
  device's (each GPU is checked on its own)."""
  devices = jax.local_devices()
  total = sum(shard.data.nbytes for x in jax.tree.leaves(arrays) for shard in x.addressable_shards)
  return total if devices[0].platform == 'cpu' else total // len(devices)


def shard_bytes(tree) -> int:
  """The bytes one device holds of `tree` (arrays, or shapes with their shardings)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _size(n: float) -> str:
  """Bytes as '10.3 GB', or '71 MB' under a gigabyte."""
  return f'{n / GB:.1f} GB' if abs(n) >= GB else f'{n / 1e6:.0f} MB'


def accumulator_bytes(micro_batches: int, params_bytes: int) -> int:
  """What a step of `micro_batches` > 1 adds to one without (`StepMemory.estimate`'s `accumulators`)."""
  return 2 * params_bytes if micro_batches == 1 else 0


def fitting_micro_batches(memory: StepMemory, limit: float, *, batch_size: int, micro_batches: int,
                          data_devices: int, params_bytes: int = 0) -> int | None:
  """The fewest micro-batches (more than `micro_batches`, dividing `batch_size` over `data_devices`)
  whose estimated peak (`StepMemory.estimate`: temporaries scaling with the micro-batch) is within
  `limit` bytes; None when even a micro-batch of one example a device is estimated over it."""
  extra = accumulator_bytes(micro_batches, params_bytes)
  for n in range(micro_batches + 1, batch_size + 1):
    if batch_size % n or (batch_size // n) % data_devices:
      continue
    if memory.estimate(micro_batches / n, extra) <= limit:
      return n
  return None


def check(memory: StepMemory | None, *, batch_size: int, micro_batches: int, data_devices: int,
          resident: int = 0, params_bytes: int = 0, available=None) -> None:
  """Logs the train step's planned peak and raises ConfigError (one line: the need, what is available,
  the setting that would fit) when it is over `FIT_FRACTION` of the available memory.

  Args:
    memory: `step_memory` of the first train call (None: nothing known, nothing checked).
    batch_size, micro_batches, data_devices: the run's (config.batch_size, optimizer.micro_batches, the
      devices each batch is split over).
    resident: bytes the plan counts that are already placed (`resident_bytes`).
    params_bytes: one model's params, for the estimate of the gradients' accumulators.
    available: `available_bytes()`'s (bytes, source), or None to read it now.
  """
  if memory is None:
    logging.info('Train step memory: not known (XLA gives no memory analysis for this call).')
    return
  available = available_bytes() if available is None else available
  c = memory.copies
  parts = (f'temp {_size(c * memory.temp)} + arguments {_size(c * memory.arguments)} + '
           f'outputs {_size(c * (memory.outputs - memory.alias))}'
           + (f', {c} devices' if c > 1 else ''))
  if available is None:
    logging.info('Train step memory: %s planned (%s); the memory available is not known.',
                 _size(memory.peak), parts)
    return
  free, source = available
  free += resident
  logging.info('Train step memory: %s planned (%s); %s available (%s%s).', _size(memory.peak), parts,
               _size(free), source, f' and the data already loaded, {_size(resident)}' if resident else '')
  limit = FIT_FRACTION * free
  if memory.peak <= limit:
    return
  n = fitting_micro_batches(memory, limit, batch_size=batch_size, micro_batches=micro_batches,
                            data_devices=data_devices, params_bytes=params_bytes)
  micro = batch_size // micro_batches
  extra = accumulator_bytes(micro_batches, params_bytes)
  if n is not None:
    smaller = batch_size * micro_batches // n
    estimate = memory.estimate(micro_batches / n, extra)
    fix = (f'use --config.optimizer.micro_batches={n} (about {_size(estimate)}), or a smaller batch such '
           f'as --config.batch_size={smaller}')
  else:
    fix = (f'even micro-batches of one example a device would need about '
           f'{_size(memory.estimate(data_devices / micro, extra))}; use a smaller model or model.image_size')
  raise ConfigError(
      f'the train step needs {_size(memory.peak)} (batch_size={batch_size} in {micro_batches} '
      f'micro-batch{"es" if micro_batches > 1 else ""} of {micro}; {parts}) but {_size(free)} is '
      f'available ({source}; a step may plan {FIT_FRACTION:.0%} of it); {fix}')

