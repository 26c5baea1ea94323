"""Net A (11 weight layers), Table 1; the net the paper trains from random N(0, 0.01^2)."""

from vgg_jax import default_config


def get_config(arg=None):
  """arg: the training scale, 'S=256', 'S=384' or 'S=256-512' (Table 3); default S = 256."""
  config = default_config.get_config(arg)
  config.variant = 'A'
  return config
