"""Fast CPU primitives of the VGG net: a convolution whose kernel gradient is computed as
matmuls, and a 2x2/2 max-pool with an elementwise gradient.

Both give XLA's values and gradients; they exist because XLA's CPU backend computes these two
gradients slowly (benchmarks/conv_grads.py). On GPU and TPU `models.VGG` uses XLA's own by
default (`uses_matmul_weight_grad`).
"""

import jax
import jax.numpy as jnp
from jax import lax

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


@jax.custom_vjp
def conv_matmul_weight_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv`, whose kernel gradient is `shifted_matmul_weight_grad` rather than XLA's.

  XLA's CPU backend computes a kernel gradient as a convolution with an N x H x W window,
  slower than the same FLOPs as matmuls where H and W are large (conv1-conv3;
  benchmarks/conv_grads.py, BENCHMARKS.md). The value and the input gradient are XLA's.
  """
  return conv(x, kernel)


def _conv_fwd(x, kernel):
  return conv(x, kernel), (x, kernel)


def _conv_bwd(residuals, grad):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: conv(x, kernel), x)
  (grad_x,) = input_vjp(grad)
  grad_kernel = shifted_matmul_weight_grad(x, grad, kernel.shape[0])
  return grad_x, grad_kernel.astype(kernel.dtype)


conv_matmul_weight_grad.defvjp(_conv_fwd, _conv_bwd)

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


@jax.custom_vjp
def _max_pool_2x2(x: jax.Array) -> jax.Array:
  top_left, top_right, bottom_left, bottom_right = _window_corners(x)
  return jnp.maximum(jnp.maximum(top_left, top_right), jnp.maximum(bottom_left, bottom_right))


def _max_pool_2x2_fwd(x):
  y = _max_pool_2x2(x)
  return y, (x, y)


def _max_pool_2x2_bwd(residuals, grad):
  """Each window's gradient goes to its first maximum, as XLA's select-and-scatter sends it."""
  x, y = residuals
  taken = jnp.zeros(y.shape, bool)
  parts = []
  for corner in _window_corners(x):
    chosen = (corner == y) & ~taken
    taken = taken | chosen
    parts.append(jnp.where(chosen, grad, jnp.zeros((), grad.dtype)))
  top, bottom = jnp.stack(parts[:2], axis=3), jnp.stack(parts[2:], axis=3)
  n, height, width, channels = grad.shape
  return (jnp.stack([top, bottom], axis=2).reshape(n, 2 * height, 2 * width, channels),)


_max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """Sec. 2.1's 2x2 max-pool with stride 2: `nn.max_pool`'s values and gradients, exactly.

  Written as a maximum of the four window corners, with a backward pass of elementwise
  selects, because XLA's CPU select-and-scatter (max_pool's gradient) is slower
  (benchmarks/conv_grads.py, BENCHMARKS.md). Odd sizes (dense evaluation only) take XLA's
  reduce_window, as `nn.max_pool` does.
  """
  if x.shape[1] % 2 or x.shape[2] % 2:
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
  return _max_pool_2x2(x)
