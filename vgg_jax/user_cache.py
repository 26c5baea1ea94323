"""vgg_jax's per-user cache folder: compiled kernels (`winograd`) and, by default, the copies
of training splits read by index (`datasets.random_access`). No JAX, TensorFlow or
ml_collections here: accelerator images and benchmarks import it without them."""

import os


def cache_dir() -> str:
  """$XDG_CACHE_HOME/vgg_jax, else ~/.cache/vgg_jax."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'vgg_jax')
