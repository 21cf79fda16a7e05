"""Data parallelism as a wrapper: the same step under `jax.jit` over a device mesh or under `jax.pmap`.

Every step draws the *global* batch exactly as a single-device run does (the epoch's permutation and a
per-batch key from (data_key, epoch, step), over the whole dataset, which every device holds), then
`shard_batch` keeps each device's part:

- `jit`: state and dataset replicated over a 1-D mesh of all devices; a sharding constraint P('data') on
  the batch lets XLA split the work, and BatchNorm statistics and the mean loss (hence the gradients) over
  the sharded batch become all-reduces that XLA inserts. No collective appears in the model code.
- `pmap`: the state carries a leading axis of local devices; each device slices its rows of the global
  batch by `axis_index`, BatchNorm averages its statistics over the axis (`axis_name`), and `train_step`
  averages the gradients and sums the metrics.

So the order, augmentation and BatchNorm statistics are those of one device, up to float rounding of the
cross-device reductions. `batch_size` must be a multiple of the device count (`check_batch_sizes`). An
epoch's last partial batch that the devices do not divide runs unsharded under jit (every device computes
all of it, so its BatchNorm statistics stay exact); under pmap it is an error unless
`data.drop_remainder`. Eval batches are padded to a multiple of the device count, the padding masked.

Several seeds (`num_seeds` = k > 1, jit only): the state, the epoch's permutations and the data keys carry
a leading axis of k and every step is `jax.vmap`-ed over it (`seeded`). The mesh is then 2-D,
('seeds', 'data'): `seed_mesh_shape` puts s devices along 'seeds' (each trains k / s of the models, with no
communication between them) and splits each model's batch over the other n / s; the vmap's
`spmd_axis_name` maps its seed axis onto 'seeds', so `shard_batch`'s constraint becomes P('seeds', 'data').

Across processes (`jax.distributed`), every process holds the whole dataset, computes the same global
batch indices and runs the same program; each device computes only its shard. Checkpoints hold the state
as one globally replicated pytree (`to_checkpoint_layout`), so they restore on any number of devices.
"""

import dataclasses
import os

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from cifar_jax.errors import ConfigError

DATA_AXIS = 'data'  # the mesh axis (jit) and the pmap axis_name that the batch is split over
SEED_AXIS = 'seeds'  # num_seeds > 1: the mesh axis the independent models are split over
MODES = ('jit', 'pmap')
# Read when the config leaves a field unset; jax.distributed.initialize itself reads only the address.
ENV_COORDINATOR_ADDRESS = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
# What jax's SLURM detection reads (jax/_src/clusters/slurm_cluster.py); srun sets them all in each task.
SLURM_TASK_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                        'SLURM_LOCALID')


def _env_int(name: str, default: int) -> int:
  value = os.environ.get(name, '')
  if not value:
    return default
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f'{name}={value!r} must be an integer') from None


def initialize_distributed(distributed_config) -> bool:
  """Joins a multi-process run when one is configured (config fields, else JAX_* variables).

  Must run before anything touches a JAX device. Fields left unset ('', 0, -1) fall back to
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; whatever is still missing is left to
  jax's own cluster detection (Slurm, Open MPI). Nothing configured: the tasks of `srun --ntasks=N`
  (N > 1) join as N processes (`_join_slurm_tasks`); otherwise a single process.

  Returns:
    Whether this process is part of a multi-process run.
  """
  if jax.distributed.is_initialized():
    return True
  address = distributed_config.coordinator_address or os.environ.get(ENV_COORDINATOR_ADDRESS, '')
  num_processes = distributed_config.num_processes or _env_int(ENV_NUM_PROCESSES, 0)
  process_id = distributed_config.process_id
  if process_id < 0:
    process_id = _env_int(ENV_PROCESS_ID, -1)
  if not address and num_processes <= 0 and process_id < 0:
    return _join_slurm_tasks()
  if not address and num_processes <= 1 and process_id < 0:
    return False
  if num_processes == 1:
    return False
  if num_processes > 1 and process_id >= num_processes:
    raise ConfigError(
        f'distributed.process_id={process_id} must be in 0..{num_processes - 1} '
        f'(distributed.num_processes={num_processes})')
  try:
    jax.distributed.initialize(coordinator_address=address or None,
                               num_processes=num_processes if num_processes > 0 else None,
                               process_id=process_id if process_id >= 0 else None)
  except (ValueError, TypeError) as e:
    raise ConfigError(
        f'distributed: cannot start a multi-process run ({e}); set distributed.coordinator_address '
        '(host:port of process 0), distributed.num_processes and distributed.process_id, or '
        f'{ENV_COORDINATOR_ADDRESS}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}') from e
  except RuntimeError as e:  # JAX was used before
    raise ConfigError(f'distributed: {e}') from e
  return True


def _join_slurm_tasks() -> bool:
  """Under `srun --ntasks=N` (N > 1): this task joins the N processes through jax's SLURM detection.

  SLURM_NTASKS > 1 without the rest of SLURM_TASK_VARIABLES is a shell that srun did not start (an sbatch
  script, an allocation's shell, a node one logged in to: jax-ml/jax#30073), where jax would fail on a
  missing variable: one line saying what to run instead.
  """
  tasks = _env_int('SLURM_NTASKS', 0)
  if tasks <= 1:
    return False
  missing = [name for name in SLURM_TASK_VARIABLES if not os.environ.get(name)]
  if missing:
    raise ConfigError(
        f"SLURM_NTASKS={tasks} but {', '.join(missing)} not set: this process is not a task that srun "
        'started; start one process per task with `srun cifar-jax ...`, or train in this one process with '
        '--config.distributed.num_processes=1')
  try:
    jax.distributed.initialize()  # coordinator, process count and id from SLURM's variables
  except (ValueError, TypeError, KeyError) as e:
    raise ConfigError(f'distributed: cannot join the {tasks} SLURM tasks ({e})') from e
  except RuntimeError as e:  # JAX was used before
    raise ConfigError(f'distributed: {e}') from e
  return True


def _host_array(x) -> np.ndarray:
  x = np.asarray(x)
  return x.astype(jax.dtypes.canonicalize_dtype(x.dtype))  # a Python int step: int32, as jnp makes it


def _put(tree, sharding: NamedSharding):
  """Host values (or arrays) placed with `sharding`, each device taking its index of the whole value."""

  def put(x):
    x = _host_array(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


@dataclasses.dataclass(frozen=True)
class Parallel:
  """How a run lays its arrays over the devices: `mode` ('jit' or 'pmap') over `mesh` (all devices)."""

  mode: str
  mesh: Mesh
  num_seeds: int = 1  # > 1: states carry a leading seed axis and the steps are vmap-ed over it

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def data_devices(self) -> int:
    """The devices one model's batch is split over (all of them, unless seeds are split too)."""
    return self.mesh.shape[DATA_AXIS]

  @property
  def axis_name(self) -> str | None:
    """The collective axis of the model's BatchNorm and of `train_step`: only pmap needs one."""
    return DATA_AXIS if self.mode == 'pmap' else None

  @property
  def is_main_process(self) -> bool:
    """Process 0 writes metrics, TensorBoard events, config.json and the progress bar."""
    return jax.process_index() == 0

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def _local_mesh(self) -> Mesh:
    # pmap's own order of the local devices, so its inputs need no copy.
    return Mesh(np.array(jax.local_devices()), (DATA_AXIS,))

  # Placement ----------------------------------------------------------------------------------------

  # pmap's layout converts through the host: once per checkpoint, and no device op to compile.

  def to_checkpoint_layout(self, tree):
    """The state as a step takes it -> globally replicated arrays (what orbax saves and restores)."""
    if self.mode == 'jit':
      return tree
    return self._put_replicated(self.host(tree))

  def to_step_layout(self, tree):
    """Globally replicated arrays -> the layout the steps take (pmap: a leading axis of local devices)."""
    if self.mode == 'jit':
      return tree
    return self._put_stacked(jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree))

  def replicate(self, tree):
    """Host values, or arrays on one device, placed whole on every device, in the steps' layout."""
    return self._put_replicated(tree) if self.mode == 'jit' else self._put_stacked(tree)

  def _put_replicated(self, tree):
    return _put(tree, self.replicated)

  def place_seeds(self, tree):
    """Host values with a leading axis of num_seeds, split over the mesh's 'seeds' axis."""
    return _put(tree, NamedSharding(self.mesh, P(SEED_AXIS)))

  def place_per_seed(self, tree):
    """A tree of every seed (`steps.per_seed`) placed for the steps: split over 'seeds', or replicated."""
    return self.replicate(tree) if self.num_seeds == 1 else self.place_seeds(tree)

  def abstract_per_seed(self, tree):
    """The shapes `place_per_seed` gives a tree of one seed's shapes (`jax.eval_shape`), as
    `jax.ShapeDtypeStruct`s with their shardings: what a step compiles for before the arrays exist."""
    if self.mode == 'pmap':
      lead, sharding = (jax.local_device_count(),), NamedSharding(self._local_mesh, P(DATA_AXIS))
    elif self.num_seeds > 1:
      lead, sharding = (self.num_seeds,), NamedSharding(self.mesh, P(SEED_AXIS))
    else:
      lead, sharding = (), self.replicated
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        lead + tuple(x.shape), jax.dtypes.canonicalize_dtype(x.dtype), sharding=sharding), tree)

  def host_shape(self, x) -> tuple[int, ...]:
    """The shape `host` gives an array (or shape) in the steps' layout."""
    return tuple(x.shape[1:] if self.mode == 'pmap' else x.shape)

  def _put_stacked(self, tree):
    sharding = NamedSharding(self._local_mesh, P(DATA_AXIS))
    copies = jax.local_device_count()

    def put(x):
      x = _host_array(x)
      return jax.device_put(np.broadcast_to(x, (copies,) + x.shape), sharding)

    return jax.tree.map(put, tree)

  def shard_eval_arrays(self, arrays):
    """Eval arrays (num_batches, batch, ...) split over the devices along the batch axis.

    The batch must be a multiple of the device count (`eval_batch_multiple`); its padding is masked.
    """
    if self.mode == 'jit':
      sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))
      return tuple(jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
                   for a in arrays)
    n, local = self.num_devices, jax.local_device_count()
    first = jax.process_index() * local  # any disjoint rows do: the eval sums are psum-ed
    sharding = NamedSharding(self._local_mesh, P(DATA_AXIS))

    def split(a):
      a = a.reshape((a.shape[0], n, a.shape[1] // n) + a.shape[2:])
      return jax.device_put(np.ascontiguousarray(np.moveaxis(a, 1, 0)[first:first + local]), sharding)

    return tuple(split(a) for a in arrays)

  @property
  def eval_batch_multiple(self) -> int:
    return self.data_devices

  def host(self, tree):
    """Numpy values of one replica of a tree in the steps' layout (metrics, the step count)."""
    if self.num_seeds > 1:  # split over 'seeds': gather every seed (one process)
      return jax.tree.map(np.asarray, tree)

    def get(x):
      data = np.asarray(x.addressable_shards[0].data)
      return data[0] if self.mode == 'pmap' else data

    return jax.tree.map(get, tree)

  # Inside a step ------------------------------------------------------------------------------------

  def shard_batch(self, batch):
    """This device's part of a global batch (a tree of arrays with the batch axis first)."""
    size = jax.tree.leaves(batch)[0].shape[0]
    if self.mode == 'jit':
      if size % self.data_devices:  # the last partial batch: every device computes all of it
        return batch
      return jax.lax.with_sharding_constraint(batch, NamedSharding(self.mesh, P(DATA_AXIS)))
    per_device = size // self.num_devices
    start = jax.lax.axis_index(DATA_AXIS) * per_device
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, per_device), batch)

  # Wrapping -----------------------------------------------------------------------------------------

  def seeded(self, fn, in_axes=0):
    """`fn` over every seed: vmap-ed over the leading seed axis (`in_axes` as jax.vmap's), or itself."""
    if self.num_seeds == 1:
      return fn
    return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=SEED_AXIS)

  def compile(self, fn, *args, donate_argnums=(), in_axes=0):
    """`fn` compiled for `args` (in the steps' layout); every output comes back replicated.

    jit: an ahead-of-time executable (a call with other shapes is an error, never a recompile).
    pmap: the pmapped function, its one compilation done now (at its first call when several
    processes run). `in_axes` (pmap only) marks host scalars
    (None) among arrays with a device axis (0).
    """
    return self.lower(fn, *args, donate_argnums=donate_argnums, in_axes=in_axes)()

  def lower(self, fn, *args, donate_argnums=(), in_axes=0, out_replicated=False):
    """`compile` in two halves: traces and lowers `fn` now, and returns the function that compiles it.

    The compile runs in XLA without Python, so a run compiles its programs in threads at once
    (`program.Program.compile`). `out_replicated` (jit): outputs without a seed axis (an ensemble's).
    """
    if self.mode == 'jit':
      # With seeds every output has the leading seed axis (`seeded`), split like the inputs.
      seeded = self.num_seeds > 1 and not out_replicated
      out = NamedSharding(self.mesh, P(SEED_AXIS)) if seeded else self.replicated
      return jax.jit(fn, out_shardings=out, donate_argnums=donate_argnums).lower(*args).compile
    pmapped = jax.pmap(fn, axis_name=DATA_AXIS, in_axes=in_axes, donate_argnums=donate_argnums)
    if jax.process_count() > 1:  # across processes pmap cannot lower ahead; its first call compiles
      return lambda: pmapped
    lowered = pmapped.lower(*args)

    def compile_pmapped():
      lowered.compile()  # fills pmap's cache: the calls that follow do not compile
      return pmapped

    return compile_pmapped


def create(parallelism: str, devices=None, num_seeds: int = 1, seed_devices: int = 0) -> Parallel:
  """The layout of a run over `devices` (default: all devices of all processes)."""
  if parallelism not in MODES:
    raise ConfigError(f'parallelism must be one of {list(MODES)}, got {parallelism!r}')
  devices = jax.devices() if devices is None else devices
  if num_seeds == 1:
    return Parallel(parallelism, Mesh(np.array(devices), (DATA_AXIS,)))
  if parallelism != 'jit':
    raise ConfigError(f'num_seeds={num_seeds} needs parallelism=jit, got {parallelism!r}')
  shape = seed_mesh_shape(num_seeds, seed_devices, len(devices))
  return Parallel(parallelism, Mesh(np.array(devices).reshape(shape), (SEED_AXIS, DATA_AXIS)), num_seeds)


def seed_mesh_shape(num_seeds: int, seed_devices: int, num_devices: int) -> tuple[int, int]:
  """(devices along 'seeds', devices along 'data'); `seed_devices` 0 = gcd(num_seeds, num_devices)."""
  s = seed_devices or np.gcd(num_seeds, num_devices)
  if num_seeds % s or num_devices % s:
    raise ConfigError(
        f'seed_devices={seed_devices} must divide both num_seeds={num_seeds} and the device count '
        f'{num_devices}; use 0 (automatic: {np.gcd(num_seeds, num_devices)})')
  return int(s), num_devices // int(s)


def check_batch_split(batch_size: int, num_devices: int, mode: str) -> None:
  """The global batch must split evenly over the devices; raises ConfigError naming the fix."""
  n = num_devices
  if n > 1 and batch_size % n:
    lower, upper = (batch_size // n) * n, (batch_size // n + 1) * n
    options = f'{lower} or {upper}' if lower else f'{upper}'
    raise ConfigError(
        f'batch_size={batch_size} does not split evenly over the {n} devices '
        f'(parallelism={mode}); use a multiple of {n} such as {options}, or fewer devices '
        '(CUDA_VISIBLE_DEVICES)')


def check_batch_sizes(mode: str, num_devices: int, batch_size: int, num_examples: int,
                      drop_remainder: bool) -> None:
  """`check_batch_split`, and under pmap the last partial batch of an epoch must split too."""
  n = num_devices
  check_batch_split(batch_size, n, mode)
  last = num_examples % batch_size
  if mode == 'pmap' and last and not drop_remainder and last % n:
    raise ConfigError(
        f'the last batch of each epoch has {num_examples} % {batch_size} = {last} examples, which '
        f'do not split over the {n} devices under parallelism=pmap; set data.drop_remainder=True, '
        f'or parallelism=jit (which runs that batch unsharded)')
