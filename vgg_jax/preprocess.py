"""The on-device half of the paper's input transform (Sec. 3.1): colour shift, mean subtraction.

Batches cross to the accelerator as uint8 (4x fewer bytes than float32); the geometric part
(rescale to S, crop, flip) runs on the host in `input_pipeline`, the arithmetic here.
"""

import jax
import jax.numpy as jnp
import numpy as np

# AlexNet's PCA of ILSVRC RGB pixel values in [0, 1] (Krizhevsky et al. 2012, Sec. 4.1).
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]], np.float32)


def color_shift(rng: jax.Array, batch_size: int, std: float) -> jax.Array:
  """One AlexNet PCA colour shift per image, in 0-255 units: (batch_size, 3).

  shift = eigvec @ (alpha * eigval), alpha ~ N(0, std^2) per image and eigen-component; the
  eigen-decomposition is of [0, 1] pixels, hence the factor 255.
  """
  alpha = std * jax.random.normal(rng, (batch_size, 3), jnp.float32)
  return 255.0 * (alpha * PCA_EIGVAL) @ PCA_EIGVEC.T


def normalize(images: jax.Array, mean_rgb, dtype=jnp.float32) -> jax.Array:
  """uint8 NHWC -> `dtype`, minus the training-set mean RGB (Sec. 2.1's only pre-processing)."""
  return (images.astype(jnp.float32) - jnp.asarray(mean_rgb, jnp.float32)).astype(dtype)


def train_images(images: jax.Array, rng: jax.Array, mean_rgb, color_shift_std: float,
                 dtype=jnp.float32) -> jax.Array:
  """Training images: mean subtraction plus a random colour shift per image."""
  shift = color_shift(rng, images.shape[0], color_shift_std)
  mean = jnp.asarray(mean_rgb, jnp.float32)
  return (images.astype(jnp.float32) - mean + shift[:, None, None, :]).astype(dtype)
