"""F(4x4, 3x3) Winograd convolutions on the CPU, their transforms as C++ XLA custom calls.

Every VGG convolution but C's 1x1 layers is 3x3 with stride 1, the case Winograd's minimal
filtering was made for (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
CVPR 2016): F(4x4, 3x3) computes each 4x4 output tile from a 6x6 input tile with 36
elementwise products, turning a convolution into 36 matmuls with 4x fewer multiplies. XLA's
CPU backend runs those matmuls well but the transforms around them slowly
(benchmarks/winograd.py), so the transforms are C++ (`winograd.cc`), compiled with the
system's C++ compiler on first use and cached per source, jax version and CPU. The input and
kernel gradients are computed in the Winograd domain too (dV = dM U^T, dU = V^T dM).

`models.Conv` takes this path as `config.conv_algorithm` says (`uses_winograd`); where no
compiler is found, 'auto' keeps XLA's convolution and says so once. For fixed weights
(`vgg_jax.features`, `predict`), the kernels are transformed once beforehand
(`transformed_kernels`) and multiplied by a C++ kernel of their own (`products`).
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import default_config

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'winograd.cc')
# Custom-call target -> the handler symbol winograd.cc exports.
TARGETS = {'vgg_jax_wino_input': 'WinoInput', 'vgg_jax_wino_output': 'WinoOutput',
           'vgg_jax_wino_output_t': 'WinoOutputT', 'vgg_jax_wino_input_t': 'WinoInputT',
           'vgg_jax_wino_kernel': 'WinoKernel', 'vgg_jax_wino_kernel_t': 'WinoKernelT',
           'vgg_jax_wino_products': 'WinoProducts'}
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


def _cache_folder() -> str:
  folder = default_config.cache_dir()
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError:
    folder = os.path.join(tempfile.gettempdir(), 'vgg_jax')
    os.makedirs(folder, exist_ok=True)
  return folder


def _cpu_signature() -> bytes:
  """The CPU's feature flags: a library built with -march=native runs only where they match."""
  try:
    with open('/proc/cpuinfo', 'rb') as f:
      return next((line for line in f if line.startswith((b'flags', b'Features'))), b'')
  except OSError:
    return os.uname().machine.encode()


def compiler() -> Optional[str]:
  """The C++ compiler: $CXX, else g++, c++ or clang++ from the PATH; None if there is none."""
  candidates = [os.environ.get('CXX')] + ['g++', 'c++', 'clang++']
  return next((shutil.which(c) for c in candidates if c and shutil.which(c)), None)


def _build(cxx: str) -> str:
  """The path of the compiled library, compiling it unless it is in the cache (one process
  at a time: the others wait for its file)."""
  import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only, as the build is)
  with open(SOURCE, 'rb') as f:
    key = hashlib.sha256(f.read() + jax.__version__.encode() + _cpu_signature()).hexdigest()
  library = os.path.join(_cache_folder(), f'winograd_{key[:16]}.so')
  with open(f'{library}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(library):
      return library
    partial = f'{library}.{os.getpid()}.partial'
    command = [cxx, '-O3', '-march=native', '-shared', '-fPIC', '-std=c++17', '-w',
               f'-I{jax.ffi.include_dir()}', SOURCE, '-o', partial]
    logging.info('Compiling the Winograd kernels (once, 10-20 s): %s', ' '.join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      lines = result.stderr.strip().splitlines() or ['no message']
      first_error = next((line for line in lines if 'error' in line), lines[-1])
      raise RuntimeError(f'{os.path.basename(cxx)} could not compile it ({first_error.strip()})')
    os.replace(partial, library)
  return library


@functools.cache
def _load() -> Optional[str]:
  """Compiles (or finds in the cache) and registers the kernels: None if done, else why not."""
  cxx = compiler()
  if cxx is None:
    return 'no C++ compiler (g++, c++ or clang++, or $CXX) on the PATH'
  try:
    library = ctypes.cdll.LoadLibrary(_build(cxx))
  except (OSError, RuntimeError) as e:
    return f'{SOURCE} was not built: {e}'
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
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


def _call(target: str, shape, *args, **attributes) -> jax.Array:
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method='sequential')(*args, **attributes)


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
  is the faster (conv2 and conv3 at batch 8: BENCHMARKS.md, benchmarks/conv_algorithms.py)."""
  return _call('vgg_jax_wino_products', (36, v.shape[1], features), v, packed)


def input_transform(x: jax.Array) -> jax.Array:
  """x (N, H, W, C) -> V (36, tiles, C): B^T d B of every 6x6 input tile (stride 4)."""
  n, height, width, channels = x.shape
  return _call('vgg_jax_wino_input', (36, _tiles(n, height, width), channels), x)


def kernel_transform(kernel: jax.Array, after: Optional[jax.Array] = None) -> jax.Array:
  """HWIO (3, 3, C, K) -> U (36, C, K): G g G^T, computed once `after` is (so that every
  layer's U is not made, and held, at the start of the net)."""
  return _call('vgg_jax_wino_kernel', (36, *kernel.shape[2:]), kernel,
               kernel if after is None else after)


# Output transform modes of winograd.cc: + bias, + bias then ReLU.
_BIAS, _BIAS_RELU = 1, 2


def output_transform(m: jax.Array, bias: jax.Array, shape, relu: bool) -> jax.Array:
  """M (36, tiles, K) -> y `shape` (N, H, W, K): A^T m A of every tile, cropped, + bias,
  then ReLU if `relu`."""
  return _call('vgg_jax_wino_output', shape, m, bias,
               mode=np.int32(_BIAS_RELU if relu else _BIAS))


def _products(v: jax.Array, u: jax.Array) -> jax.Array:
  return jnp.einsum('epc,eck->epk', v, u)


def _forward(x, kernel, bias, relu, transformed=None):
  v = input_transform(x)
  if transformed is None:
    u = kernel_transform(kernel, v)
    m = _products(v, u)
  else:
    u, m = None, products(v, transformed, kernel.shape[-1])
  y = output_transform(m, bias, (*x.shape[:3], kernel.shape[-1]), relu)
  return y, (v, u, y)


def _backward(relu, residuals, dy):
  """The input gradient and the kernel gradient in the Winograd domain: with dM = A dy A^T
  (dy masked by y > 0 after a ReLU), dV = dM U^T and dU = V^T dM; the bias gradient sums
  the masked dy."""
  v, u, y = residuals
  n, height, width, features = dy.shape
  dm = _call('vgg_jax_wino_output_t', (36, _tiles(n, height, width), features), dy, y,
             mode=np.int32(1 if relu else 0))
  dx = _call('vgg_jax_wino_input_t', (n, height, width, u.shape[1]),
             jnp.einsum('epk,eck->epc', dm, u))
  dkernel = _call('vgg_jax_wino_kernel_t', (3, 3, *u.shape[1:]),
                  jnp.einsum('epc,epk->eck', v, dm))
  if relu:
    dy = jnp.where(y > 0, dy, jnp.zeros((), dy.dtype))
  return dx, dkernel, dy.sum((0, 1, 2)), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv_bias_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array, relu: bool = True,
                   transformed: Optional[jax.Array] = None) -> jax.Array:
  """A 3x3, stride-1, 'SAME' convolution (NHWC x HWIO), + bias, then ReLU if `relu`, by
  F(4x4, 3x3): XLA's `ops.conv(x, kernel) + bias` up to float32 rounding. float32 only.

  `transformed`: `kernel`'s U made beforehand for fixed weights (`transformed_kernels`), used
  where the call is not differentiated (inference) in place of the kernel transform.
  Differentiated, U is made from `kernel`, so gradients never depend on it.
  """
  return _forward(x, kernel, bias, relu, transformed)[0]


conv_bias_relu.defvjp(
    lambda x, kernel, bias, relu, transformed: _forward(x, kernel, bias, relu), _backward)
