"""Fast CPU primitives of the VGG net: a convolution whose kernel gradient is computed as
matmuls, and a 2x2/2 max-pool with an elementwise gradient.

Both give XLA's values and derivatives (of any order, forward or reverse, and vmap); they exist
because XLA's CPU backend computes these two gradients slowly (benchmarks/conv_grads.py). On
GPU and TPU `models.VGG` uses XLA's convolution by default (`uses_matmul_weight_grad`).
"""

import functools
from typing import Optional

import jax
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.extend import core as jex_core
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir
import jax.numpy as jnp

# vgg_jax's own primitives (here and in `winograd`) under shard_map: like JAX's, each result
# varies over the mesh axes its operands vary over (`abstract_array`), and binding one casts an
# invariant operand (a parameter) to varying first (`Primitive`), so that the cast's transpose
# sums its cotangent over the devices. Read and written with JAX's internals (`.mat`), for want
# of a public API; tests/test_winograd.py checks gradients under shard_map against XLA's.


def _varying(aval: jax.core.ShapedArray) -> frozenset:
  return aval.mat.varying


class Primitive(jex_core.Primitive):
  """A primitive that, bound, first casts its first `aligned` operands (all by default) to
  vary over the same mesh axes."""

  def __init__(self, name: str, aligned: Optional[int] = None):
    super().__init__(name)
    self.aligned = aligned

  def bind(self, *operands, **params):
    count = len(operands) if self.aligned is None else self.aligned
    axes = frozenset().union(*(_varying(jax.typeof(x)) for x in operands[:count]))
    cast = [jax.lax.pcast(x, tuple(missing), to='varying')
            if i < count and (missing := axes - _varying(jax.typeof(x))) else x
            for i, x in enumerate(operands)]
    return super().bind(*cast, **params)


def abstract_array(shape, dtype, *operands: jax.core.ShapedArray) -> jax.core.ShapedArray:
  """The abstract value of a primitive's result of `shape` and `dtype`, computed from
  `operands` (abstract values, as `Primitive.bind` aligns them)."""
  first = operands[0]
  varying = frozenset().union(*map(_varying, operands))
  mat = first.mat if varying == _varying(first) else first.mat.update(varying=varying)
  sharding = first.sharding.update(spec=jax.sharding.PartitionSpec(*[None] * len(shape)))
  return first.update(shape=tuple(shape), dtype=dtype, weak_type=False, sharding=sharding,
                      manual_axis_type=mat)


def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'SAME' convolution, NHWC x HWIO -> NHWC."""
  return lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def shifted_matmul_weight_grad(x: jax.Array, grad: jax.Array, kernel_size: int) -> jax.Array:
  """The kernel gradient of `conv`: one matmul per kernel tap, (k, k, C, F) in float32.

  Tap (i, j) of the kernel sees the input shifted by (i - k//2, j - k//2), so its gradient
  is that shifted input, flattened to (N*H*W, C), transposed times the output gradient
  (N*H*W, F).
  """
  n, height, width, channels = x.shape
  pad = kernel_size // 2
  padded = jnp.pad(x, ((0, 0), (pad, kernel_size - 1 - pad), (pad, kernel_size - 1 - pad),
                       (0, 0)))
  grad = grad.reshape(n * height * width, -1)
  taps = [jnp.matmul(padded[:, i:i + height, j:j + width].reshape(-1, channels).T, grad,
                     preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
          for i in range(kernel_size) for j in range(kernel_size)]
  return jnp.stack(taps).reshape(kernel_size, kernel_size, channels, grad.shape[-1])


@jax.custom_jvp
def conv_matmul_weight_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv`, whose kernel gradient is `shifted_matmul_weight_grad` rather than XLA's.

  XLA's CPU backend computes a kernel gradient as a convolution with an N x H x W window,
  slower than the same FLOPs as matmuls where H and W are large (conv1-conv3;
  benchmarks/conv_grads.py, BENCHMARKS.md). The value and the input gradient are XLA's. Its
  tangent is `conv`'s, with the kernel's part a primitive whose transpose is the matmuls, so
  derivatives of any order, in either mode, and vmap are `conv`'s.
  """
  return conv(x, kernel)


@functools.partial(conv_matmul_weight_grad.defjvp, symbolic_zeros=True)
def _conv_jvp(primals, tangents):
  (x, kernel), (dx, dkernel) = primals, tangents
  parts = []
  if not isinstance(dx, SymbolicZero):
    parts.append(conv(dx, kernel))
  if not isinstance(dkernel, SymbolicZero):
    parts.append(_conv_of_kernel.bind(x, dkernel))
  y = conv(x, kernel)
  return y, functools.reduce(jnp.add, parts) if parts else jnp.zeros_like(y)


def _conv_of_kernel_transpose(cotangent, x, kernel):
  assert not ad.is_undefined_primal(x), 'linear in the kernel only'
  if type(cotangent) is ad.Zero:
    return [None, None]
  grad = shifted_matmul_weight_grad(x, cotangent, kernel.aval.shape[0])
  return [None, grad.astype(kernel.aval.dtype)]


# conv(x, kernel) as a map linear in the kernel, x fixed: the kernel's tangent in
# `conv_matmul_weight_grad`, transposed to `shifted_matmul_weight_grad`.
_conv_of_kernel = Primitive('vgg_jax_conv_of_kernel')
_conv_of_kernel.def_impl(conv)
_conv_of_kernel.def_abstract_eval(
    lambda x, kernel: abstract_array((*x.shape[:3], kernel.shape[3]), x.dtype, x, kernel))
mlir.register_lowering(_conv_of_kernel, mlir.lower_fun(conv, multiple_results=False))
ad.defjvp(_conv_of_kernel, lambda dx, x, kernel: conv(dx, kernel),
          lambda dkernel, x, kernel: _conv_of_kernel.bind(x, dkernel))
ad.primitive_transposes[_conv_of_kernel] = _conv_of_kernel_transpose
batching.primitive_batchers[_conv_of_kernel] = (
    lambda operands, dims: (jax.vmap(conv, in_axes=dims)(*operands), 0))

# How the convolutions' kernel gradients are computed (`VGG.weight_grad`).
WEIGHT_GRADS = ('auto', 'conv', 'matmul')
# 'auto' takes the matmuls for kernel gradients of at least this many FLOPs: between the
# large layers of net A at 128 x 128 (0.9-5 GFLOP), which train faster with them, and the
# 1/8-width digits net's (under 0.08 GFLOP), whose many small matmuls cost more than they
# save (BENCHMARKS.md, benchmarks/train_step.py).
MATMUL_WEIGHT_GRAD_MIN_FLOPS = 2 ** 28


def uses_matmul_weight_grad(weight_grad: str, flops: float) -> bool:
  """Whether a kernel gradient of `flops` FLOPs is computed as matmuls. 'auto': on CPU, where
  XLA's kernel-gradient convolutions are slow, for large enough layers; XLA's convolution
  elsewhere (cuDNN and the TPU compiler do it well)."""
  if weight_grad not in WEIGHT_GRADS:
    raise ValueError(f'weight_grad={weight_grad!r}: expected one of {", ".join(WEIGHT_GRADS)}.')
  return weight_grad == 'matmul' or (weight_grad == 'auto' and jax.default_backend() == 'cpu'
                                     and flops >= MATMUL_WEIGHT_GRAD_MIN_FLOPS)


def _window_corners(x: jax.Array) -> tuple[jax.Array, ...]:
  """The four corners of every 2x2 window of x (N, H, W, C), in row-major window order."""
  n, height, width, channels = x.shape
  windows = x.reshape(n, height // 2, 2, width // 2, 2, channels)
  return tuple(windows[:, :, i, :, j] for i in (0, 1) for j in (0, 1))


@jax.custom_jvp
def _max_pool_2x2(x: jax.Array) -> jax.Array:
  top_left, top_right, bottom_left, bottom_right = _window_corners(x)
  return jnp.maximum(jnp.maximum(top_left, top_right), jnp.maximum(bottom_left, bottom_right))


def _first_maxima(x: jax.Array, y: jax.Array) -> jax.Array:
  """(N, H/2, 2, W/2, 2, C): True at each window's first maximum (row-major), the input XLA's
  select-and-scatter sends the window's gradient to."""
  taken = jnp.zeros(y.shape, bool)
  chosen = []
  for corner in _window_corners(x):
    chosen.append((corner == y) & ~taken)
    taken = taken | chosen[-1]
  return jnp.stack([jnp.stack(chosen[:2], axis=3), jnp.stack(chosen[2:], axis=3)], axis=2)


@_max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
  """The tangent of each window's first maximum: its transpose, the gradient, is one
  elementwise select on the input's grid."""
  (x,), (dx,) = primals, tangents
  y = _max_pool_2x2(x)
  n, height, width, channels = x.shape
  windows = dx.reshape(n, height // 2, 2, width // 2, 2, channels)
  return y, jnp.where(_first_maxima(x, y), windows, jnp.zeros((), dx.dtype)).sum((2, 4))


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """Sec. 2.1's 2x2 max-pool with stride 2: `nn.max_pool`'s values and derivatives, exactly.

  Written as a maximum of the four window corners, whose tangent is that of each window's
  first maximum, transposed to a backward pass of elementwise selects, because XLA's CPU
  select-and-scatter (max_pool's gradient) is slower (benchmarks/conv_grads.py,
  BENCHMARKS.md). Odd sizes (dense evaluation only) take XLA's reduce_window, as
  `nn.max_pool` does.
  """
  if x.shape[1] % 2 or x.shape[2] % 2:
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
  return _max_pool_2x2(x)
