"""The VGG ConvNets of Simonyan & Zisserman (ICLR 2015), configurations A-E of Table 1.

Every configuration is five blocks of 3x3 (and, in C, 1x1) convolutions, each block closed by a
2x2/2 max-pool, then three fully-connected layers (Sec. 2.1). `VGG_SPECS` writes Table 1 down as
data; the `VGG` module just walks it, naming every layer as the paper's tables do (`conv3_2`,
`fc6`) so a parameter tree reads like Table 1.
"""

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vgg_jax import ops
from vgg_jax import winograd

Dtype = Any
# The variable collection of precomputed Winograd kernels (`winograd.transformed_kernels`).
WINOGRAD = 'winograd'
# config.dtype: what the net computes in; parameters stay float32.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Table 1. Each block is a list of (kernel size, output channels); "LRN" marks A-LRN's local
# response normalisation after conv1_1.
LRN = 'LRN'
VGG_SPECS = {
    'A': (((3, 64),), ((3, 128),), ((3, 256),) * 2, ((3, 512),) * 2, ((3, 512),) * 2),
    'A-LRN': (((3, 64), LRN), ((3, 128),), ((3, 256),) * 2, ((3, 512),) * 2, ((3, 512),) * 2),
    'B': (((3, 64),) * 2, ((3, 128),) * 2, ((3, 256),) * 2, ((3, 512),) * 2, ((3, 512),) * 2),
    'C': (((3, 64),) * 2, ((3, 128),) * 2,
          ((3, 256), (3, 256), (1, 256)), ((3, 512), (3, 512), (1, 512)),
          ((3, 512), (3, 512), (1, 512))),
    'D': (((3, 64),) * 2, ((3, 128),) * 2, ((3, 256),) * 3, ((3, 512),) * 3, ((3, 512),) * 3),
    'E': (((3, 64),) * 2, ((3, 128),) * 2, ((3, 256),) * 4, ((3, 512),) * 4, ((3, 512),) * 4),
}
VARIANTS = tuple(VGG_SPECS)
FC_WIDTH = 4096
# The paper's training crop; fc6 of the full-size net sees a (224 / 32)^2 = 7 x 7 grid.
PAPER_IMAGE_SIZE = 224
# The classifier sees a (size / 32)^2 grid: five 2x2/2 max-pools (Sec. 2.1).
DOWNSAMPLING = 32

# AlexNet's LRN hyper-parameters, reused by A-LRN (Sec. 2.1).
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


def local_response_norm(x: jax.Array, size: int = LRN_SIZE, alpha: float = LRN_ALPHA,
                        beta: float = LRN_BETA, k: float = LRN_K) -> jax.Array:
  """AlexNet's cross-channel LRN: x / (k + alpha * sum of x^2 over `size` channels)^beta.

  As in Krizhevsky et al. (2012), alpha multiplies the plain sum (Caffe and PyTorch divide it
  by `size`). Computed in float32 for range; returns x's dtype.
  """
  squares = jnp.square(x.astype(jnp.float32))
  half = size // 2
  padded = jnp.pad(squares, [(0, 0)] * (x.ndim - 1) + [(half, size - 1 - half)])
  window_sum = sum(padded[..., i:i + x.shape[-1]] for i in range(size))
  return (x.astype(jnp.float32) / (k + alpha * window_sum) ** beta).astype(x.dtype)


def paper_init(std: float = 0.01) -> Callable:
  """Sec. 3.1: weights from a zero-mean normal, biases zero.

  The paper writes "variance 1e-2", but its Caffe code and every later re-implementation
  (torchvision included) use a standard deviation of 0.01; variance 1e-2 (std 0.1) makes the
  logits of an 11-layer ReLU net explode. `std` is a config field, so either reading is one
  flag away.
  """
  return nn.initializers.normal(stddev=std)


# config.init: the kernels' initialiser, given the 'paper' scheme's std.
INITS = {'paper': paper_init, 'glorot': lambda std: nn.initializers.glorot_uniform()}


def kernel_init(init: str, std: float = 0.01) -> Callable:
  """'paper' (N(0, std^2), Sec. 3.1) or 'glorot' (Glorot & Bengio 2010, uniform).

  The paper notes (end of Sec. 3.1) that Glorot initialisation makes net-A pre-training of the
  deeper nets unnecessary.
  """
  if init not in INITS:
    raise ValueError(f'init={init!r}: expected one of {", ".join(INITS)}.')
  return INITS[init](std)


def full_size_std(std: float, fan_in: int, full_size_fan_in: int) -> float:
  """The std that gives a layer of fan-in `fan_in` the gain N(0, std^2) gives the same layer
  of the paper's net (full width, 224 crop), whose fan-in is `full_size_fan_in`.

  A ReLU layer with N(0, s^2) weights multiplies its signal's variance by fan_in * s^2 / 2
  (He et al. 2015), so equal gains need s^2 proportional to 1 / fan_in. At width 1/8 the
  middle convolutions' fan-ins are 8x smaller, and fc6 on a 32 x 32 crop 392x smaller, than
  the paper's: with the same std, a narrow net would not show Sec. 3.1's stalled training.
  """
  return std * math.sqrt(full_size_fan_in / fan_in)


def _keep_valid(x: jax.Array, sizes: Optional[jax.Array]) -> jax.Array:
  """Zeroes x (N, H, W, C) outside each image's valid (height, width); x itself if None."""
  if sizes is None:
    return x
  rows = jnp.arange(x.shape[1])[None, :, None] < sizes[:, 0, None, None]
  cols = jnp.arange(x.shape[2])[None, None, :] < sizes[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], x, jnp.zeros((), x.dtype))


class Conv(nn.Module):
  """A stride-1 'SAME' k x k convolution with bias, then ReLU if `relu`, parameters named as
  nn.Conv names them ('kernel' (k, k, C, F), 'bias').

  How it is computed is a choice that leaves the values, and every derivative and batching JAX
  takes of them (grad, jvp, linearize, Hessian-vector products, grad of grad, vmap), as XLA's
  convolution gives them, up to float32 rounding (which may put a pre-activation within
  rounding of zero on the ReLU's other side, and its derivative with it, as any two float32
  computations may): `conv_algorithm` picks Winograd's F(4x4, 3x3) (`winograd.uses_winograd`)
  or XLA's convolution, and for XLA's, `weight_grad` how its kernel gradient is computed
  (`ops.uses_matmul_weight_grad`).
  """
  features: int
  kernel_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  relu: bool = False
  conv_algorithm: str = 'auto'
  weight_grad: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init,
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    transformed = self.get_variable(WINOGRAD, 'kernel')
    if winograd.uses_winograd(self.conv_algorithm, x.shape, kernel.shape, x.dtype,
                              transformed=transformed is not None):
      return winograd.conv_bias_relu(x, kernel, bias, self.relu, transformed)
    flops = 2 * math.prod(x.shape[:-1]) * kernel.size
    conv = (ops.conv_matmul_weight_grad if ops.uses_matmul_weight_grad(self.weight_grad, flops)
            else ops.conv)
    x = conv(x, kernel) + bias
    return nn.relu(x) if self.relu else x


def scaled(channels: int, width: float) -> int:
  return max(1, int(round(channels * width)))


class GridDense(nn.Module):
  """fc6: a fully-connected layer on the (g, g, C) grid of conv5 features, kept as a
  (g * g * C, features) kernel, that can also slide over a larger grid as a g x g convolution.

  Sec. 3.2's dense evaluation: "the first FC layer is converted to a 7 x 7 conv. layer". The
  convolution reads the same kernel, reshaped in the (row, column, channel) order the flatten
  uses, so a checkpoint holds one copy of fc6 for both uses. The grid is square, as training
  crops are.
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, dense: bool = False) -> jax.Array:
    _, height, width, channels = x.shape
    if not dense:
      kernel = self.param('kernel', self.kernel_init, (height * width * channels, self.features),
                          self.param_dtype)
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      x, kernel, bias = nn.dtypes.promote_dtype(x.reshape(x.shape[0], -1), kernel, bias,
                                                dtype=self.dtype)
      return x @ kernel + bias
    kernel = self.get_variable('params', 'kernel')
    bias = self.get_variable('params', 'bias')
    if kernel is None:
      raise ValueError('Dense evaluation applies trained parameters: initialise the model on '
                       'training-size images, then call it with dense=True.')
    grid = math.isqrt(kernel.shape[0] // channels)
    if grid * grid * channels != kernel.shape[0]:
      raise ValueError(f'fc6 kernel of shape {kernel.shape} is not a square grid of '
                       f'{channels}-channel conv5 features.')
    if height < grid or width < grid:
      raise ValueError(f'Dense evaluation needs images at least the training size: the conv5 '
                       f'grid is {height}x{width}, fc6 spans {grid}x{grid}.')
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if height == width == grid:  # One window: the same sums as a matmul, which is faster.
      return (x.reshape(x.shape[0], -1) @ kernel + bias).reshape(x.shape[0], 1, 1, -1)
    kernel = kernel.reshape(grid, grid, channels, self.features)
    x = lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return x + bias


class VGG(nn.Module):
  """A VGG net of Table 1, on NHWC inputs that are already normalised.

  Attributes:
    variant: a key of `VGG_SPECS`: 'A', 'A-LRN', 'B', 'C', 'D' or 'E'.
    num_classes: width of fc8.
    dropout_rate: dropout after fc6 and fc7, training only (Sec. 3.1).
    dtype: computation dtype; parameters are always float32, logits are returned in float32
      (float64 when computing in float64, as tests' references do).
    width: multiplies every channel count, fc6/fc7 included; 1.0 is the paper's net.
    init_scheme: 'paper' or 'glorot', see `kernel_init` (`config.init`).
    init_std: the standard deviation of the 'paper' initialisation.
    init_std_as_full_size: scale each layer's 'paper' std by sqrt(its fan-in in the
      full-size net / its fan-in here) (`full_size_std`).
    conv_algorithm: how the 3x3 convolutions are computed: 'xla' (XLA's convolution),
      'winograd' (`winograd.conv_bias_relu`, float32 on the CPU) or 'auto' (Winograd for
      large enough layers on the CPU only). Same values and derivatives, up to float32
      rounding.
    weight_grad: how XLA's convolutions' kernel gradients are computed: 'conv' (XLA's
      convolution), 'matmul' (`ops.conv_matmul_weight_grad`) or 'auto' (matmul for large
      layers on CPU only). Same values and derivatives.
  """
  variant: str = 'D'
  num_classes: int = 1000
  dropout_rate: float = 0.5
  dtype: Dtype = jnp.float32
  width: float = 1.0
  init_scheme: str = 'paper'
  init_std: float = 0.01
  init_std_as_full_size: bool = False
  conv_algorithm: str = 'auto'
  weight_grad: str = 'auto'

  def _init(self, fan_in: int, full_size_fan_in: int) -> dict:
    std = self.init_std
    if self.init_std_as_full_size:
      std = full_size_std(std, fan_in, full_size_fan_in)
    return dict(dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=kernel_init(self.init_scheme, std), bias_init=nn.initializers.zeros)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, dense: bool = False,
               sizes: Optional[jax.Array] = None) -> jax.Array:
    """Logits (N, num_classes); with `dense`, the class score map (N, h, w, num_classes).

    Dense evaluation (Sec. 3.2) runs the net fully-convolutionally on a whole test image of
    any size at least the training size: fc6 becomes a g x g convolution (g = training size
    / 32), fc7 and fc8 1 x 1 convolutions, all with the trained parameters. Each score-map
    location scores one training-size window, at stride 32.

    `sizes` (N, 2), with `dense`: each image's (height, width) in a zero-padded batch. Every
    feature map is zeroed outside the image's extent at that resolution, so a convolution
    sees the same zero border as on the image alone and the padding changes nothing: each
    image's scores equal those of the net on that image, unpadded.
    """
    if self.variant not in VGG_SPECS:
      raise ValueError(f'variant={self.variant!r}: expected one of {", ".join(VARIANTS)}.')
    if train and dense:
      raise ValueError('Dense (fully-convolutional) application is for evaluation only.')
    if not dense and (x.shape[1] % DOWNSAMPLING or x.shape[2] % DOWNSAMPLING):
      raise ValueError(f'Input of spatial size {x.shape[1:3]}: VGG needs multiples of '
                       f'{DOWNSAMPLING} (five 2x2 max-pools).')
    if sizes is not None and not dense:
      raise ValueError('sizes (valid image extents) are for dense evaluation of padded images.')
    x = _keep_valid(x.astype(self.dtype), sizes)
    full_channels = x.shape[-1]
    for block, layers in enumerate(VGG_SPECS[self.variant], start=1):
      index = 0
      for spec in layers:
        if spec == LRN:
          x = local_response_norm(x)
          continue
        index += 1
        size, channels = spec
        name = f'conv{block}_{index}'
        init = self._init(size * size * x.shape[-1], size * size * full_channels)
        full_channels = channels
        x = Conv(scaled(channels, self.width), size, name=name, relu=True,
                 conv_algorithm=self.conv_algorithm, weight_grad=self.weight_grad, **init)(x)
        x = _keep_valid(x, sizes)
      x = ops.max_pool_2x2(x)
      if sizes is not None:
        sizes = sizes // 2
        x = _keep_valid(x, sizes)
    # fc6 flattens in (height, width, channel) order, as Keras does; on a dense score map
    # fc7 and fc8 act on the channel axis of every location, i.e. as 1 x 1 convolutions.
    grid = (PAPER_IMAGE_SIZE // DOWNSAMPLING) ** 2
    init = self._init(math.prod(x.shape[1:]), grid * full_channels)
    x = nn.relu(GridDense(scaled(FC_WIDTH, self.width), name='fc6', **init)(x, dense=dense))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    init = self._init(x.shape[-1], FC_WIDTH)
    x = nn.relu(nn.Dense(scaled(FC_WIDTH, self.width), name='fc7', **init)(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    init = self._init(x.shape[-1], FC_WIDTH)
    x = nn.Dense(self.num_classes, name='fc8', **init)(x)
    return x.astype(jnp.promote_types(self.dtype, jnp.float32))


def layer_names(variant: str) -> Sequence[str]:
  """The paper's names of `variant`'s weight layers, input to output."""
  names = []
  for block, layers in enumerate(VGG_SPECS[variant], start=1):
    convs = [spec for spec in layers if spec != LRN]
    names += [f'conv{block}_{i}' for i in range(1, len(convs) + 1)]
  return names + ['fc6', 'fc7', 'fc8']


def create_model(config) -> VGG:
  """The net a config describes (its Table 1 column, width, classes, dtype and initialiser)."""
  return VGG(variant=config.variant, num_classes=config.num_classes,
             dropout_rate=config.dropout_rate, dtype=DTYPES[config.dtype], width=config.width,
             init_scheme=config.init, init_std=config.init_std,
             init_std_as_full_size=config.init_std_as_full_size,
             conv_algorithm=config.conv_algorithm, weight_grad=config.weight_grad)
