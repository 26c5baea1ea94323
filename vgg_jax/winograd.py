"""F(4x4, 3x3) Winograd convolutions on the CPU, their transforms as C++ XLA custom calls.

Every VGG convolution but C's 1x1 layers is 3x3 with stride 1, the case Winograd's minimal
filtering was made for (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
CVPR 2016): F(4x4, 3x3) computes each 4x4 output tile from a 6x6 input tile with 36
elementwise products, turning a convolution into 36 matmuls with 4x fewer multiplies. XLA's
CPU backend runs those matmuls well but the transforms around them slowly
(benchmarks/winograd.py), so the transforms are C++ (`winograd.cc`), compiled with the
system's C++ compiler on first use and kept in a private per-user cache (`cache_folder`).

Each transform is a JAX primitive that is linear (in its first operands) and knows its
transpose, a transform too: the input and kernel gradients are computed in the Winograd
domain (dV = dM U^T, dU = V^T dM), and because every derivative is again made of these
primitives, `conv_bias_relu` has derivatives of any order in either mode (jvp, linearize,
grad of grad, Hessian-vector products) and vmap, as XLA's convolution has.

`models.Conv` takes this path as `config.conv_algorithm` says (`uses_winograd`); where no
compiler is found, 'auto' keeps XLA's convolution and says so once. For fixed weights
(`vgg_jax.features`, `predict`), the kernels are transformed once beforehand
(`transformed_kernels`) and multiplied by a C++ kernel of their own (`products`).
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from typing import Optional, Sequence

from absl import logging
import jax
from jax.custom_derivatives import SymbolicZero
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir
import jax.numpy as jnp
import numpy as np

from vgg_jax import ops
from vgg_jax import user_cache

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'winograd.cc')
# FFI handler -> the symbol winograd.cc exports; registered as custom-call target
# f'{PREFIX}{handler}'.
HANDLERS = {'wino_input': 'WinoInput', 'wino_output': 'WinoOutput',
            'wino_output_t': 'WinoOutputT', 'wino_input_t': 'WinoInputT',
            'wino_kernel': 'WinoKernel', 'wino_kernel_t': 'WinoKernelT',
            'wino_products': 'WinoProducts'}
PREFIX = 'vgg_jax_'
# -march=native: a library runs only where the CPU has the features it was compiled for,
# which the cache key holds (`_cache_key`).
CXX_FLAGS = ('-O3', '-march=native', '-shared', '-fPIC', '-std=c++17', '-w')
# Winograd's outputs and gradients differ from XLA's convolution by float32 rounding alone:
# 2.4e-6 to 2.1e-5 of the largest value on every layer of net D at 224
# (benchmarks/conv_algorithms.py); tests/test_winograd.py holds them to this bound.
TOLERANCE = 1e-4

# config.conv_algorithm: how a 3x3 convolution is computed.
CONV_ALGORITHMS = ('auto', 'xla', 'winograd')
# 'auto' takes Winograd on the CPU for float32 3x3 layers of at least this many input
# channels and 4x4 output tiles, or of fewer tiles where the transformed kernel is small
# (in x out channels at most SMALL_KERNEL_CHANNELS). See `uses_winograd`.
WINOGRAD_MIN_CHANNELS = 16
WINOGRAD_MIN_TILES = 100
SMALL_KERNEL_CHANNELS = 64 * 64
SMALL_KERNEL_MIN_TILES = 32
# With U made beforehand (`transformed_kernels`), at least this many.
TRANSFORMED_MIN_TILES = 16
# U's panels of columns in `transformed_kernels` (winograd.cc's products).
PANEL = 16

_lock = threading.Lock()
_NO_COMPILER = 'no C++ compiler (g++, c++ or clang++, or $CXX) on the PATH'


def compiler() -> Optional[str]:
  """The C++ compiler: $CXX, else g++, c++ or clang++ from the PATH; None if there is none."""
  candidates = [os.environ.get('CXX')] + ['g++', 'c++', 'clang++']
  return next((shutil.which(c) for c in candidates if c and shutil.which(c)), None)


def _first_error(cxx: str, stderr: str, what: str = 'compile it') -> str:
  lines = stderr.strip().splitlines() or ['no message']
  first = next((line for line in lines if 'error' in line), lines[-1])
  return f'{os.path.basename(cxx)} could not {what} ({first.strip()})'


def _target_features(cxx: str) -> bytes:
  """The macros `cxx` predefines for -march=native (__AVX2__, __FMA__, ..., its version):
  what a library compiled here asks of the CPU, on any OS, /proc/cpuinfo readable or not."""
  result = subprocess.run([cxx, '-march=native', '-dM', '-E', '-x', 'c++', os.devnull],
                          capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(_first_error(cxx, result.stderr, 'tell the CPU features it targets'))
  return '\n'.join(sorted(result.stdout.splitlines())).encode()


def _cache_key(cxx: str, defines: Sequence[str]) -> str:
  """Of the source, jax (its FFI headers), the flags and the CPU features compiled for."""
  with open(SOURCE, 'rb') as f:
    parts = [f.read(), jax.__version__.encode(), ' '.join((*CXX_FLAGS, *defines)).encode(),
             _target_features(cxx)]
  return hashlib.sha256(b'\0'.join(parts)).hexdigest()[:16]


def _private(path: str, folder: bool = False) -> bool:
  """Whether `path` is a folder (followed if a link) or a regular file (not a link) of this
  user that no one else may write: where no one else can have put or changed a library."""
  try:
    info = os.stat(path) if folder else os.lstat(path)
  except OSError:
    return False
  kind = stat.S_ISDIR if folder else stat.S_ISREG
  return (kind(info.st_mode) and info.st_uid == os.getuid()
          and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def cache_folder() -> Optional[str]:
  """$XDG_CACHE_HOME/vgg_jax (default ~/.cache/vgg_jax), created private (0700), where the
  compiled libraries are kept; None where it cannot be made, or is not private (`_private`):
  a library there is loaded into this process, so no one else may be able to put one there."""
  folder = user_cache.cache_dir()
  try:
    os.makedirs(folder, mode=0o700, exist_ok=True)
  except OSError as e:
    logging.info('No cache for the Winograd kernels (%s).', e)
    return None
  if not _private(folder, folder=True):
    logging.warning('%s is not used for the Winograd kernels: it must be a folder of yours '
                    'that no one else can write.', folder)
    return None
  return folder


def _compile(cxx: str, defines: Sequence[str], library: str) -> None:
  partial = f'{library}.{os.getpid()}.partial'
  command = [cxx, *CXX_FLAGS, *defines, f'-I{jax.ffi.include_dir()}', SOURCE, '-o', partial]
  logging.info('Compiling the Winograd kernels (once, 5-20 s): %s', ' '.join(command))
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(_first_error(cxx, result.stderr))
  os.chmod(partial, 0o700)  # Whatever the umask: `_private` requires it.
  os.replace(partial, library)


def _cached(cxx: str, defines: Sequence[str], name: str) -> Optional[str]:
  """The library `name` in the cache folder, compiled there first (one process at a time:
  the others wait for its file) unless it is there already, as in a read-only cache; None
  without a cache folder that has it or can take it."""
  import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only, as the build is)
  folder = cache_folder()
  if folder is None:
    return None
  library = os.path.join(folder, name)
  if _private(library):
    return library
  try:
    with open(f'{library}.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not _private(library):
        _compile(cxx, defines, library)
  except OSError as e:  # A read-only cache without this library.
    logging.info('The Winograd kernels are not cached in %s (%s).', folder, e)
    return None
  return library


@contextlib.contextmanager
def _built(cxx: str, defines: Sequence[str] = ()):
  """The path of the compiled library while the context lasts: from the cache, else compiled
  into a private temporary folder (never a shared, predictable one) removed afterwards."""
  name = f'winograd_{_cache_key(cxx, defines)}.so'
  library = _cached(cxx, defines, name)
  if library is not None:
    yield library
    return
  with tempfile.TemporaryDirectory(prefix='vgg_jax_winograd_') as folder:
    library = os.path.join(folder, name)
    _compile(cxx, defines, library)
    yield library


def load(defines: Sequence[str] = (), prefix: str = PREFIX) -> ctypes.CDLL:
  """Compiles winograd.cc with `defines` (or finds it in the cache), loads it and registers
  its handlers as custom-call targets f'{prefix}{handler}'. OSError or RuntimeError if not."""
  cxx = compiler()
  if cxx is None:
    raise RuntimeError(_NO_COMPILER)
  with _built(cxx, defines) as path:
    library = ctypes.cdll.LoadLibrary(path)
  for handler, symbol in HANDLERS.items():
    jax.ffi.register_ffi_target(f'{prefix}{handler}', jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  return library


@functools.cache
def _load() -> Optional[str]:
  """Loads and registers the kernels (`load`): None if done, else why not."""
  if compiler() is None:
    return _NO_COMPILER
  try:
    load()
  except (OSError, RuntimeError) as e:
    return f'{SOURCE} was not built: {e}'
  return None


def unavailable_reason() -> Optional[str]:
  """None once the kernels are compiled and registered (compiling them on the first call);
  otherwise why they cannot be."""
  with _lock:
    return _load()


def available() -> bool:
  return unavailable_reason() is None


@functools.cache
def _warn_unavailable(reason: str) -> None:
  logging.warning('conv_algorithm=auto: XLA\'s convolutions, not Winograd\'s (%s).', reason)


def uses_winograd(algorithm: str, x_shape, kernel_shape, dtype,
                  backend: Optional[str] = None, transformed: bool = False) -> bool:
  """Whether a convolution of input `x_shape` (N, H, W, C) and HWIO `kernel_shape` is computed
  by `conv_bias_relu` (config.conv_algorithm).

  'xla': never. 'winograd': every float32 3x3 layer on the CPU, an error elsewhere. 'auto':
  on the CPU, float32 3x3 layers of at least WINOGRAD_MIN_CHANNELS input channels and
  WINOGRAD_MIN_TILES 4x4 tiles (SMALL_KERNEL_MIN_TILES where C x K <= SMALL_KERNEL_CHANNELS).
  Measured per layer (benchmarks/conv_algorithms.py, BENCHMARKS.md): a contraction over
  conv1_1's 3 channels gains nothing, and with few tiles (conv4 and conv5 at 224, batch 1: 49
  and 16) the kernel transform, 4x the kernel (38 MB at 512 x 512), costs more than the
  matmuls save, unless the kernel is small enough to stay in cache. GPUs and TPUs keep XLA's
  convolutions, which cuDNN and the TPU compiler choose well.
  """
  if algorithm not in CONV_ALGORITHMS:
    raise ValueError(f'conv_algorithm={algorithm!r}: expected one of '
                     f'{", ".join(CONV_ALGORITHMS)}.')
  backend = backend or jax.default_backend()
  if algorithm == 'xla' or tuple(kernel_shape[:2]) != (3, 3):
    return False
  if algorithm == 'winograd':
    if backend != 'cpu' or jnp.dtype(dtype) != jnp.float32:
      raise ValueError(f'conv_algorithm=winograd runs float32 on the CPU, not {jnp.dtype(dtype)} '
                       f'on {backend}: use conv_algorithm=auto or xla.')
    reason = unavailable_reason()
    if reason:
      raise RuntimeError(f'conv_algorithm=winograd: {reason}. Use conv_algorithm=auto or xla.')
    return True
  channels, features = kernel_shape[2:]
  tiles = _tiles(*x_shape[:3])
  enough_tiles = (tiles >= WINOGRAD_MIN_TILES
                  or (transformed and tiles >= TRANSFORMED_MIN_TILES)
                  or (channels * features <= SMALL_KERNEL_CHANNELS
                      and tiles >= SMALL_KERNEL_MIN_TILES))
  if (backend != 'cpu' or jnp.dtype(dtype) != jnp.float32
      or channels < WINOGRAD_MIN_CHANNELS or not enough_tiles):
    return False
  reason = unavailable_reason()
  if reason:
    _warn_unavailable(reason)
  return reason is None


def _tiles(n: int, height: int, width: int) -> int:
  return n * -(-height // 4) * -(-width // 4)


def _call(handler: str, shape, *args, vmap_method: Optional[str] = None,
          **attributes) -> jax.Array:
  """winograd.cc's `handler` on `args`, a float32 result of `shape`; the kernels are compiled
  and registered on first use."""
  reason = unavailable_reason()
  if reason:
    raise RuntimeError(f'The Winograd kernels cannot run: {reason}. Use conv_algorithm=xla.')
  return jax.ffi.ffi_call(f'{PREFIX}{handler}', jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method=vmap_method)(*args, **attributes)


# ---------------------------------------------------------------- the transforms as primitives
def _primitive(shape, channel_operands: Optional[int] = None):
  """Makes `impl(*operands, out_shape, **params)` (arrays to winograd.cc) a primitive whose
  float32 result is of shape(*operand shapes, **params).

  Each transforms every channel (the last axis of its first `channel_operands` operands, all
  by default, and of its result) alike and apart from the others, so vmap folds the batch
  axis into the channels: one call on B x C channels. Operands past those only order it.
  """
  def define(impl):
    def call(*operands, **params):
      return impl(*operands, out_shape=shape(*(x.shape for x in operands), **params), **params)

    primitive = ops.Primitive(f'{PREFIX}{impl.__name__.strip("_")}', aligned=channel_operands)
    primitive.def_impl(call)
    primitive.def_abstract_eval(lambda *avals, **params: ops.abstract_array(
        shape(*(a.shape for a in avals), **params), jnp.float32, *avals[:channel_operands]))
    mlir.register_lowering(primitive, mlir.lower_fun(call, multiple_results=False),
                           platform='cpu')
    batching.primitive_batchers[primitive] = functools.partial(_batched, primitive)
    return primitive
  return define


def _batched(primitive, operands, dims, **params):
  count = primitive.aligned or len(operands)
  if all(d is None for d in dims[:count]):  # Only an ordering operand is batched.
    order = [x if d is None else jnp.take(x, 0, axis=d) for x, d in zip(operands, dims)]
    return primitive.bind(*operands[:count], *order[count:], **params), None
  size = next(x.shape[d] for x, d in zip(operands, dims) if d is not None)

  def into_channels(x, d):
    if d is None:
      x = jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], size, x.shape[-1]))
    else:
      x = jnp.moveaxis(x, d, -2)
    return x.reshape(*x.shape[:-2], -1)

  folded = [into_channels(x, d) if i < count else x
            for i, (x, d) in enumerate(zip(operands, dims))]
  out = primitive.bind(*folded, **params)
  return out.reshape(*out.shape[:-1], size, -1), out.ndim - 1


def _linear(primitive, transpose, linear_operands: int = 1) -> None:
  """Declares `primitive` linear in its first `linear_operands` operands (the others, a mask
  or an ordering, are constants of the map): its tangent is the primitive of the tangents,
  and `transpose(cotangent, *operands, **params)` its transpose."""
  def jvp(primals, tangents, **params):
    out = primitive.bind(*primals, **params)
    linear = tangents[:linear_operands]
    if all(type(t) is ad.Zero for t in linear):
      return out, ad.Zero(jax.typeof(out).to_tangent_aval())
    return out, primitive.bind(*map(ad.instantiate_zeros, linear), *primals[linear_operands:],
                               **params)

  def transpose_or_zero(cotangent, *operands, **params):
    if type(cotangent) is ad.Zero:
      return [None] * len(operands)
    return transpose(cotangent, *operands, **params)

  ad.primitive_jvps[primitive] = jvp
  ad.primitive_transposes[primitive] = transpose_or_zero


def _tiles_shape(x_shape):
  """(N, H, W, C) -> (36, tiles, C)."""
  return (36, _tiles(*x_shape[:3]), x_shape[3])


@_primitive(_tiles_shape)
def _input(x, *, out_shape):
  """x (N, H, W, C) -> V (36, tiles, C): B^T d B of every 6x6 input tile (stride 4)."""
  return _call('wino_input', out_shape, x)


@_primitive(lambda dv, *, spatial: (*spatial, dv[2]))
def _input_t(dv, *, spatial, out_shape):
  """dV (36, tiles, C) -> dx (spatial + (C,)): the transpose of _input."""
  del spatial
  return _call('wino_input_t', out_shape, dv)


@_primitive(lambda g, after: (36, *g[2:]), channel_operands=1)
def _kernel(g, after, *, out_shape):
  """HWIO g (3, 3, C, K), `after` (any array) -> U (36, C, K): G g G^T, made once `after` is."""
  return _call('wino_kernel', out_shape, g, after)


@_primitive(lambda du: (3, 3, *du[1:]))
def _kernel_t(du, *, out_shape):
  """dU (36, C, K) -> dg (3, 3, C, K): the transpose of _kernel."""
  return _call('wino_kernel_t', out_shape, du)


# winograd.cc's output transform modes: + bias, + bias then ReLU; its transpose's: plain,
# dy masked by y > 0.
_BIAS, _BIAS_RELU = 1, 2
_PLAIN, _MASKED = 0, 1


@_primitive(lambda m, bias, *, spatial, relu: (*spatial, m[2]))
def _output(m, bias, *, spatial, relu, out_shape):
  """M (36, tiles, K), bias (K,) -> y (spatial + (K,)): A^T m A of every tile, cropped, +
  bias, then ReLU if `relu`. Without the ReLU, linear in (M, bias)."""
  del spatial
  return _call('wino_output', out_shape, m, bias, mode=np.int32(_BIAS_RELU if relu else _BIAS))


@_primitive(lambda m, bias, y: y)
def _masked_output(m, bias, y, *, out_shape):
  """(M, bias, y) -> A^T m A + bias where y > 0, else 0: the tangent of _output's ReLU."""
  y_then = _call('wino_output', out_shape, m, bias, mode=np.int32(_BIAS))
  return jnp.where(y > 0, y_then, 0.0)


@_primitive(lambda dy, *y: _tiles_shape(dy))
def _output_t(dy, *y, out_shape):
  """dy (N, H, W, K)[, y] -> dM (36, tiles, K): A dy A^T, dy masked by y > 0 if y is given:
  the transpose of _output without the ReLU (no y) and of _masked_output (y)."""
  return _call('wino_output_t', out_shape, dy, *(y or (dy,)),
               mode=np.int32(_MASKED if y else _PLAIN))


def _output_jvp(primals, tangents, *, spatial, relu):
  y = _output.bind(*primals, spatial=spatial, relu=relu)
  if all(type(t) is ad.Zero for t in tangents):
    return y, ad.Zero(jax.typeof(y).to_tangent_aval())
  dm, dbias = map(ad.instantiate_zeros, tangents)
  if relu:
    return y, _masked_output.bind(dm, dbias, y)
  return y, _output.bind(dm, dbias, spatial=spatial, relu=False)


def _output_transpose(cotangent, m, bias, *, spatial, relu):
  assert not relu, 'the ReLU is not linear'
  del spatial
  return [_output_t.bind(cotangent) if ad.is_undefined_primal(m) else None,
          cotangent.sum((0, 1, 2)) if ad.is_undefined_primal(bias) else None]


def _masked_output_transpose(cotangent, m, bias, y):
  return [_output_t.bind(cotangent, y) if ad.is_undefined_primal(m) else None,
          jnp.where(y > 0, cotangent, 0.0).sum((0, 1, 2)) if ad.is_undefined_primal(bias)
          else None,
          None]


def _output_t_transpose(cotangent, dy, *y):
  bias = jnp.zeros(cotangent.shape[-1], cotangent.dtype)
  if y:
    return [_masked_output.bind(cotangent, bias, *y), None]
  return [_output.bind(cotangent, bias, spatial=dy.aval.shape[:3], relu=False)]


_linear(_input, lambda ct, x: [_input_t.bind(ct, spatial=x.aval.shape[:3])])
_linear(_input_t, lambda ct, dv, *, spatial: [_input.bind(ct)])
_linear(_kernel, lambda ct, g, after: [_kernel_t.bind(ct), None])
_linear(_kernel_t, lambda ct, du: [_kernel.bind(ct, ct)])
_linear(_masked_output, _masked_output_transpose, linear_operands=2)
_linear(_output_t, _output_t_transpose)
ad.primitive_jvps[_output] = _output_jvp
ad.primitive_transposes[_output] = _output_transpose


# ---------------------------------------------------------------- public functions
def transformed_kernels(params: dict, algorithm: str, dtype) -> dict:
  """{layer: {'kernel': U packed}} for the 3x3 layers of a parameter tree that `uses_winograd`
  may compute so, for nets whose weights stay fixed (inference): passed to
  `model.apply` as the 'winograd' collection, they spare each call the kernel transforms, and
  layers with few tiles (conv4 and conv5 at batch 1) then gain too. {} where no layer can."""
  def candidate(kernel):  # At a size with tiles enough.
    return kernel.ndim == 4 and uses_winograd(
        algorithm, (1, 4 * WINOGRAD_MIN_TILES, 4, kernel.shape[2]), kernel.shape, dtype)
  kernels = {name: leaf['kernel'] for name, leaf in params.items()
             if isinstance(leaf, dict) and 'kernel' in leaf and candidate(leaf['kernel'])}
  return {name: {'kernel': u} for name, u in _transform_all(kernels).items()}


@jax.jit
def _transform_all(kernels: dict) -> dict:
  return {name: _packed(kernel_transform(jnp.asarray(kernel, jnp.float32)))
          for name, kernel in kernels.items()}


def _packed(u: jax.Array) -> jax.Array:
  """U (36, C, K) -> (36, ceil(K / 16), C, 16): panels of 16 columns, zero beyond K, the
  layout `products` reads in order."""
  channels, features = u.shape[1:]
  padded = jnp.pad(u, ((0, 0), (0, 0), (0, -features % PANEL)))
  return padded.reshape(36, channels, -1, PANEL).transpose(0, 2, 1, 3)


def products(v: jax.Array, packed: jax.Array, features: int) -> jax.Array:
  """V (36, tiles, C) and U packed (`_packed`) -> M (36, tiles, K): the 36 matmuls, in C++.

  With few tiles (conv3 to conv5 at batch 1), XLA's batched matmul spends more time reading
  U, strided, than multiplying; this kernel reads each panel in order. With many tiles XLA's
  is the faster (conv2 and conv3 at batch 8: BENCHMARKS.md, benchmarks/conv_algorithms.py).
  Not differentiable: `conv_bias_relu` differentiates the kernel's own transform instead."""
  return _call('wino_products', (36, v.shape[1], features), v, packed,
               vmap_method='sequential')


def input_transform(x: jax.Array) -> jax.Array:
  """x (N, H, W, C) -> V (36, tiles, C): B^T d B of every 6x6 input tile (stride 4)."""
  return _input.bind(x)


def kernel_transform(kernel: jax.Array, after: Optional[jax.Array] = None) -> jax.Array:
  """HWIO (3, 3, C, K) -> U (36, C, K): G g G^T, computed once `after` is (so that every
  layer's U is not made, and held, at the start of the net)."""
  return _kernel.bind(kernel, kernel if after is None else after)


def output_transform(m: jax.Array, bias: jax.Array, shape, relu: bool) -> jax.Array:
  """M (36, tiles, K) -> y `shape` (N, H, W, K): A^T m A of every tile, cropped, + bias,
  then ReLU if `relu`."""
  return _output.bind(m, bias, spatial=tuple(shape[:3]), relu=relu)


def _conv(x, kernel, bias, relu):
  v = input_transform(x)
  m = jnp.einsum('epc,eck->epk', v, kernel_transform(kernel, v))
  return output_transform(m, bias, (*x.shape[:3], kernel.shape[-1]), relu)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _conv_kept(x, kernel, bias, transformed, relu):
  m = products(input_transform(x), transformed, kernel.shape[-1])
  return output_transform(m, bias, (*x.shape[:3], kernel.shape[-1]), relu)


@functools.partial(_conv_kept.defjvp, symbolic_zeros=True)
def _conv_kept_jvp(relu, primals, tangents):
  """Differentiated, U is made from the kernel (`_conv`): derivatives never read the kept U."""
  live = [i for i, t in enumerate(tangents[:3]) if not isinstance(t, SymbolicZero)]

  def conv(*live_args):
    args = list(primals[:3])
    for i, arg in zip(live, live_args):
      args[i] = arg
    return _conv(*args, relu)

  if not live:  # Only the kept U varies, and nothing depends on it.
    y = conv()
    return y, jnp.zeros_like(y)
  return jax.jvp(conv, [primals[i] for i in live], [tangents[i] for i in live])


def conv_bias_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array, relu: bool = True,
                   transformed: Optional[jax.Array] = None) -> jax.Array:
  """A 3x3, stride-1, 'SAME' convolution (NHWC x HWIO), + bias, then ReLU if `relu`, by
  F(4x4, 3x3): XLA's `ops.conv(x, kernel) + bias` up to float32 rounding, as are its
  derivatives of any order and its vmap. float32 only.

  `transformed`: `kernel`'s U made beforehand for fixed weights (`transformed_kernels`), used
  where the call is not differentiated (inference) in place of the kernel transform.
  Differentiated, U is made from `kernel`, so derivatives never depend on it.
  """
  if transformed is None:
    return _conv(x, kernel, bias, relu)
  return _conv_kept(x, kernel, bias, transformed, relu)
