"""oneDNN convolutions for XLA:CPU: `conv_general_dilated`, a drop-in for the `lax` one in `nn.Conv`.

XLA:CPU's own convolutions (Eigen or YNNPACK) are slower than oneDNN's, the library PyTorch uses on the
CPU, and XLA surrounds every weight-gradient convolution with transposes of its two operands (a quarter
of a ResNet18 step, BENCHMARKS.md). `csrc/onednn_conv.cc` calls oneDNN's forward, backward-data and
backward-weights convolutions on the NHWC activations where they lie, through XLA's FFI; this module
builds it on first use (a C++ compiler and the `onednn-devel-cpu-gomp` headers, both checked), caches the
library under ~/.cache/cifar_jax, registers the three handlers and gives them a `custom_vjp`. Under
`jax.vmap` (k seeds in one run, SWAG's samples) a convolution stays one call over every batch element,
which the handler spreads over the cores, one convolution per core on one thread (BENCHMARKS.md, "Seeds
in one run").

Float32 always; bfloat16 (all three operands, float32 accumulation inside oneDNN, the result rounded once,
as XLA's bfloat16 convolution does) where the CPU has bfloat16 instructions (`bfloat16_flag`: AVX512-BF16
or AMX-BF16), since elsewhere oneDNN would emulate them and XLA's is the better choice.

The same library holds oneDNN's training-mode batch normalisation (`batch_norm_train`: forward and
backward, float32 or bfloat16 activations with float32 statistics, an optional fused ReLU), which
`layers.TorchBatchNorm(impl='onednn')` uses where `builders.bn_impl` picks it.

Every oneDNN call runs on one thread of the library's (named `onednn`), whichever of XLA:CPU's threads
reaches it: one OpenMP team for the process, whose workers stay awake between the calls of a step
(`OPENMP_SPIN_COUNT`), instead of a team per calling thread, each woken afresh (csrc/onednn_conv.cc,
`OneThread`; BENCHMARKS.md, "One OpenMP team for oneDNN's calls"). `set_one_thread(False)` runs them on
the calling threads instead, as `builders.create_model` asks where XLA's BatchNorm runs between them.

`available()` says whether it can be used here; `conv_general_dilated` hands every convolution it does not
support (`supports`) to lax; callers pick it only when `available()` is true
(`models.ResNet(conv_impl='onednn')`, chosen by `builders.conv_impl`).
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
import threading

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

SOURCE = os.path.join(os.path.dirname(__file__), 'csrc', 'onednn_conv.cc')
TARGETS = {
    'forward': 'OnednnConvForward',
    'backward_data': 'OnednnConvBackwardData',
    'backward_weights': 'OnednnConvBackwardWeights',
    'batch_norm_forward': 'OnednnBatchNormForward',
    'batch_norm_backward': 'OnednnBatchNormBackward',
}
_NHWC = ('NHWC', 'HWIO', 'NHWC')
# /proc/cpuinfo flags of the CPUs on which oneDNN runs bfloat16 convolutions natively (AVX512-BF16 on
# Cooper Lake, Zen 4 and later; AMX-BF16 on Sapphire Rapids and later).
BFLOAT16_FLAGS = ('amx_bf16', 'avx512_bf16')
CPUINFO = '/proc/cpuinfo'
# How long libgomp's idle workers spin before they sleep (iterations: 10 ms by libgomp's own rough
# estimate of 100,000 a millisecond), when neither GOMP_SPINCOUNT nor OMP_WAIT_POLICY is set: long enough
# to span the XLA ops between two oneDNN calls of a step, so that a call does not begin by waking its
# team. libgomp reads it once, when it is loaded with the library (`load`), and the process's
# environment is left as it was.
OPENMP_SPIN_COUNT = '1000000'

_lock = threading.Lock()
_state = {'loaded': None, 'error': None, 'library': None, 'one_thread': True}


def _prefix() -> str:
  # pip puts the onednn wheels' data files (include/, lib/) under the environment's prefix.
  return sysconfig.get_paths()['data']


def _compiler() -> str | None:
  return shutil.which(os.environ.get('CXX', 'g++')) or shutil.which('c++')


def _cache_dir() -> str:
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'cifar_jax')


def _build_command(compiler: str, output: str) -> list[str]:
  prefix = _prefix()
  return [compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w',
          f'-I{jax.ffi.include_dir()}', f'-I{os.path.join(prefix, "include")}', SOURCE,
          '-o', output, f'-L{os.path.join(prefix, "lib")}', '-ldnnl',
          f'-Wl,-rpath,{os.path.join(prefix, "lib")}']


def _library_path(compiler: str) -> str:
  """The cached library's path: keyed by the source, the build command and jaxlib's version."""
  digest = hashlib.sha256()
  with open(SOURCE, 'rb') as f:
    digest.update(f.read())
  digest.update(' '.join(_build_command(compiler, '')).encode())
  digest.update(jax.lib.__version__.encode() if hasattr(jax.lib, '__version__') else b'')
  digest.update(jax.__version__.encode())
  return os.path.join(_cache_dir(), f'onednn_conv-{digest.hexdigest()[:16]}.so')


def missing_build_requirement() -> str | None:
  """What building the library needs and lacks here (headers, library, compiler), or None.

  It does not start JAX's backend, so `cpu_backend` can ask it before XLA_FLAGS are final.
  """
  header = os.path.join(_prefix(), 'include', 'oneapi', 'dnnl', 'dnnl.hpp')
  if not os.path.exists(header):
    return f'no oneDNN headers at {header} (pip install onednn-devel-cpu-gomp)'
  if not any(os.path.exists(os.path.join(_prefix(), 'lib', name))
             for name in ('libdnnl.so', 'libdnnl.so.3')):
    return f'no libdnnl.so under {os.path.join(_prefix(), "lib")} (pip install onednn-cpu-gomp)'
  if _compiler() is None:
    return 'no C++ compiler (g++ or $CXX) on the PATH'
  return None


def _build(compiler: str, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Several processes may build at once (tests, sweeps): each writes its own file, the rename is atomic.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  try:
    result = subprocess.run(_build_command(compiler, tmp), capture_output=True, text=True,
                            check=False)
    if result.returncode:
      raise RuntimeError(f'building {SOURCE} failed:\n{result.stderr[-4000:]}')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load() -> None:
  """Builds (once, cached) and registers the oneDNN handlers; raises RuntimeError when it cannot."""
  with _lock:
    if _state['loaded']:
      return
    if _state['error']:
      raise RuntimeError(_state['error'])
    try:
      reason = (f'the JAX backend is {jax.default_backend()}, not cpu'
                if jax.default_backend() != 'cpu' else missing_build_requirement())
      if reason:
        raise RuntimeError(f'oneDNN convolutions unavailable: {reason}')
      compiler = _compiler()
      path = _library_path(compiler)
      if not os.path.exists(path):
        logging.info('Building the oneDNN convolution library: %s', path)
        _build(compiler, path)
      with _openmp_spin():
        library = ctypes.cdll.LoadLibrary(path)
      library.cifar_jax_onednn_set_one_thread(int(_state['one_thread']))
      for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(_target_name(target, path),
                                    jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
    except (RuntimeError, OSError) as e:
      _state['error'] = str(e)
      raise RuntimeError(str(e)) from e
    _state['loaded'] = path
    _state['library'] = library


def set_one_thread(on: bool) -> None:
  """Whether every oneDNN call runs on the library's one thread (the default) or on the XLA:CPU thread
  that makes it, one at a time; for the calls from now on. `builders.create_model` chooses: one thread
  where the model's BatchNorm is oneDNN's too, so that few XLA ops separate the calls; the calling
  threads where XLA's BatchNorm runs between them (EfficientNet-Lite0 in float32), for which the
  hand-over and the spinning team cost more than they save (BENCHMARKS.md, "One OpenMP team for oneDNN's
  calls")."""
  with _lock:
    _state['one_thread'] = bool(on)
    if _state['library'] is not None:
      _state['library'].cifar_jax_onednn_set_one_thread(int(bool(on)))


@contextlib.contextmanager
def _openmp_spin():
  """GOMP_SPINCOUNT=OPENMP_SPIN_COUNT while the library (and libgomp with it) loads, unless the user
  set GOMP_SPINCOUNT or OMP_WAIT_POLICY."""
  if 'GOMP_SPINCOUNT' in os.environ or 'OMP_WAIT_POLICY' in os.environ:
    yield
    return
  os.environ['GOMP_SPINCOUNT'] = OPENMP_SPIN_COUNT
  try:
    yield
  finally:
    del os.environ['GOMP_SPINCOUNT']


def _target_name(target: str, library_path: str) -> str:
  """The custom call's name, with the library's hash: a program that a persistent compilation cache
  kept from another build of the library is not loaded (its name differs), never run with new code."""
  digest = os.path.basename(library_path)[len('onednn_conv-'):-len('.so')]
  return f'cifar_jax_onednn_conv_{target}_{digest}'


def available() -> bool:
  """Whether the oneDNN convolutions can run here (building them on the first call)."""
  try:
    load()
  except RuntimeError as e:
    logging.log_first_n(logging.INFO, 'oneDNN convolutions not used: %s', 1, e)
    return False
  return True


@functools.cache
def bfloat16_flag() -> str | None:
  """The CPU flag (`BFLOAT16_FLAGS`) that makes oneDNN's bfloat16 convolutions native here, or None."""
  try:
    with open(CPUINFO, encoding='utf-8', errors='replace') as f:
      flags = {word for line in f if line.startswith('flags') for word in line.split(':', 1)[1].split()}
  except OSError:
    return None
  return next((flag for flag in BFLOAT16_FLAGS if flag in flags), None)


def dtypes() -> tuple:
  """The dtypes this CPU's oneDNN convolutions take: float32, and bfloat16 where `bfloat16_flag()`."""
  return (jnp.float32, jnp.bfloat16) if bfloat16_flag() else (jnp.float32,)


def describe(conv_impl: str, dtype) -> str:
  """Whose convolutions a model with `conv_impl` and compute `dtype` runs, and why (for the run's log)."""
  if conv_impl != 'onednn':
    return f'XLA\'s, {jnp.dtype(dtype).name}'
  if jnp.dtype(dtype) == jnp.float32:
    return 'oneDNN\'s, float32'
  if jnp.dtype(dtype) in dtypes():
    return f'oneDNN\'s, {jnp.dtype(dtype).name} (the CPU has {bfloat16_flag()})'
  return (f'XLA\'s, {jnp.dtype(dtype).name} (the CPU has none of {", ".join(BFLOAT16_FLAGS)}, so '
          'oneDNN would emulate it)')


def _attrs(strides, padding, groups) -> dict:
  (pt, pb), (pl, pr) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]), pad_top=np.int64(pt),
              pad_bottom=np.int64(pb), pad_left=np.int64(pl), pad_right=np.int64(pr),
              groups=np.int64(groups))


def _call(target: str, out_shape, a, b, strides, padding, groups):
  # 'expand_dims': under vmap (several seeds in one run, several SWAG samples) the handler gets every
  # seed's operands in one call, with leading batch dimensions (size 1 where an operand is shared), and
  # spreads the seeds' convolutions over the cores (csrc/onednn_conv.cc, `Run`).
  load()  # registered (once) before any program that calls it compiles or loads from a cache
  return jax.ffi.ffi_call(_target_name(target, _state['loaded']),
                          jax.ShapeDtypeStruct(out_shape, a.dtype),
                          vmap_method='expand_dims')(a, b, **_attrs(strides, padding, groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_nhwc(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
              padding: tuple[tuple[int, int], tuple[int, int]], groups: int = 1) -> jax.Array:
  """An NHWC x HWIO convolution with explicit padding, through oneDNN (float32, or bfloat16 where
  `dtypes()` has it: operands and result bfloat16, accumulated in float32). `groups` is lax's
  `feature_group_count`: the kernel is (kh, kw, C / groups, O), depthwise when groups = C."""
  out_shape = jax.eval_shape(
      lambda a, b: lax.conv_general_dilated(a, b, strides, padding, dimension_numbers=_NHWC,
                                            feature_group_count=groups),
      x, kernel).shape
  return _call('forward', out_shape, x, kernel, strides, padding, groups)


def _conv_fwd(x, kernel, strides, padding, groups):
  return conv_nhwc(x, kernel, strides, padding, groups), (x, kernel)


def _conv_bwd(strides, padding, groups, residuals, dy):
  x, kernel = residuals
  dx = _call('backward_data', x.shape, dy, kernel, strides, padding, groups)
  dkernel = _call('backward_weights', kernel.shape, x, dy, strides, padding, groups)
  return dx, dkernel


conv_nhwc.defvjp(_conv_fwd, _conv_bwd)


def supports(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
             feature_group_count, batch_group_count) -> bool:
  """Whether this `lax.conv_general_dilated` call is one the oneDNN handlers cover: NHWC / HWIO, ungrouped
  or grouped (`feature_group_count`, depthwise included), no dilation, no batch groups."""
  dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  return (lhs.ndim == 4 and lhs.dtype == rhs.dtype and lhs.dtype in dtypes()
          and dims == nhwc and batch_group_count == 1
          and feature_group_count >= 1 and rhs.shape[2] * feature_group_count == lhs.shape[3]
          and rhs.shape[3] % feature_group_count == 0
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and all(d == 1 for d in (rhs_dilation or (1, 1)))
          and (isinstance(padding, str) or all(p >= 0 for pair in padding for p in pair)))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` through oneDNN where it applies (`supports`: NHWC 2-D, grouped or not, in
  float32, or bfloat16 on CPUs with bfloat16 instructions), lax otherwise."""
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count)
  if preferred_element_type is not None or not supports(*args):
    return lax.conv_general_dilated(*args[:7], feature_group_count=feature_group_count,
                                    batch_group_count=batch_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return conv_nhwc(lhs, rhs, tuple(int(s) for s in window_strides), padding, int(feature_group_count))



@functools.cache
def _workspace_bytes(n: int, rows: int, channels: int, bfloat16: bool, epsilon: float) -> int:
  """The bytes of the mask oneDNN's ReLU-fused batch normalisation keeps for its backward pass."""
  load()
  function = _state['library'].onednn_batch_norm_workspace_bytes
  function.restype = ctypes.c_int64
  function.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_float]
  size = function(n, rows, channels, int(bfloat16), epsilon)
  if size < 0:
    raise RuntimeError('oneDNN has no ReLU-fused batch normalisation for this shape')
  return size


def _norm_call(target: str, results, *operands, rank: int, epsilon: float, relu: bool):
  # 'broadcast_all': under vmap every operand arrives with the same leading dimensions, which the handler
  # loops over (csrc/onednn_conv.cc, `NormRun`).
  load()
  return jax.ffi.ffi_call(_target_name(target, _state['loaded']), results,
                          vmap_method='broadcast_all')(*operands, rank=np.int64(rank),
                                                       epsilon=np.float32(epsilon), relu=relu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, relu: bool = False):
  """Training-mode BatchNorm over every axis but the last, through oneDNN's batch normalisation
  primitives: (y, batch mean, biased batch variance), y in x's dtype (float32, or bfloat16 where
  `dtypes()` has it), the statistics float32 (oneDNN accumulates in float32 and computes the variance in
  two passes, as torch does). `scale` and `bias` are float32 (C,). `relu`: y is ReLU(BatchNorm(x)), fused
  into the same passes (oneDNN's fuse_norm_relu; its backward pass reads a bit mask kept from the forward)."""
  return _batch_norm_fwd(x, scale, bias, epsilon, relu)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, relu):
  channels = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
  rows = int(np.prod(x.shape[:-1]))
  workspace = jax.ShapeDtypeStruct(
      (_workspace_bytes(x.shape[0], rows, x.shape[-1], x.dtype == jnp.bfloat16, epsilon) if relu else 1,),
      jnp.uint8)
  y, mean, var, mask = _norm_call('batch_norm_forward',
                                  (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels, workspace),
                                  x, scale, bias, rank=x.ndim, epsilon=epsilon, relu=relu)
  return (y, mean, var), (x, mean, var, scale, mask)


def _batch_norm_bwd(epsilon, relu, residuals, cotangents):
  x, mean, var, scale, mask = residuals
  dy = cotangents[0].astype(x.dtype)
  channels = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
  dx, dscale, dbias = _norm_call('batch_norm_backward',
                                 (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels),
                                 x, dy, mean, var, scale, mask, rank=x.ndim, epsilon=epsilon, relu=relu)
  return dx, dscale, dbias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)
