"""The on-device half of the paper's input transform (Sec. 3.1): colour shift, normalisation.

Batches cross to the accelerator as uint8 (4x fewer bytes than float32); the geometric part
(rescale to S, crop, flip) runs on the host in `input_pipeline`, the arithmetic here.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# AlexNet's PCA of ILSVRC RGB pixel values in [0, 1] (Krizhevsky et al. 2012, Sec. 4.1).
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]], np.float32)
CHANNEL_ORDERS = ('RGB', 'BGR')


@dataclasses.dataclass(frozen=True)
class Normalization:
  """What a net's first layer was trained to see: (pixel - mean) / std, in `channel_order`.

  The paper subtracts the training-set mean RGB and nothing else (Sec. 2.1), from 0-255
  pixels. Imported weights may expect more: torchvision's divide [0, 1] pixels by a per-channel
  std, Caffe's and Keras' read BGR. All are this one map from uint8 RGB images, with `mean_rgb`
  and `std_rgb` in 0-255 units and RGB order (torchvision's mean 0.485 is 123.675 here).
  """
  mean_rgb: tuple[float, float, float] = (123.68, 116.779, 103.939)
  std_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)
  channel_order: str = 'RGB'

  @classmethod
  def from_config(cls, config) -> 'Normalization':
    """From config.mean_rgb, std_rgb and channel_order."""
    return cls(tuple(float(m) for m in config.mean_rgb),
               tuple(float(s) for s in config.std_rgb), config.channel_order)

  def __call__(self, images: jax.Array, dtype=jnp.float32,
               shift: Optional[jax.Array] = None) -> jax.Array:
    """uint8 (or 0-255 float) RGB NHWC images -> the net's input in `dtype`; `shift` (N, 3),
    in 0-255 units, is added to each image before the division by std (the colour shift)."""
    x = images.astype(jnp.float32) - jnp.asarray(self.mean_rgb, jnp.float32)
    if shift is not None:
      x = x + shift[:, None, None, :]
    if self.std_rgb != (1.0, 1.0, 1.0):
      x = x / jnp.asarray(self.std_rgb, jnp.float32)
    if self.channel_order == 'BGR':
      x = x[..., ::-1]
    return x.astype(dtype)


def color_shift(rng: jax.Array, batch_size: int, std: float) -> jax.Array:
  """One AlexNet PCA colour shift per image, in 0-255 units: (batch_size, 3).

  shift = eigvec @ (alpha * eigval), alpha ~ N(0, std^2) per image and eigen-component; the
  eigen-decomposition is of [0, 1] pixels, hence the factor 255.
  """
  alpha = std * jax.random.normal(rng, (batch_size, 3), jnp.float32)
  return 255.0 * (alpha * PCA_EIGVAL) @ PCA_EIGVEC.T


def normalize(images: jax.Array, normalization: Normalization,
              dtype=jnp.float32) -> jax.Array:
  """uint8 NHWC -> `dtype`, normalised as the net expects (Sec. 2.1: minus the mean RGB)."""
  return normalization(images, dtype)


def train_images(images: jax.Array, rng: jax.Array, normalization: Normalization,
                 color_shift_std: float, dtype=jnp.float32) -> jax.Array:
  """Training images: a random colour shift per image, then the normalisation."""
  return normalization(images, dtype, shift=color_shift(rng, images.shape[0], color_shift_std))
