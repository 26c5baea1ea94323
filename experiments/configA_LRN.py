"""Net A-LRN: A with AlexNet's local response normalisation after conv1_1 (Table 1)."""

from vgg_jax import default_config


def get_config(arg=None):
  """arg: the training scale, 'S=256', 'S=384' or 'S=256-512' (Table 3); default S = 256."""
  config = default_config.get_config(arg)
  config.variant = 'A-LRN'
  return config
