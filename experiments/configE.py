"""Net E (19 weight layers (VGG-19)), Table 1.

The paper initialises the deeper nets from a trained net A; its closing note in Sec. 3.1 says
Glorot initialisation trains them from scratch just as well, which is the default here.
"""

from vgg_jax import default_config


def get_config(arg=None):
  """arg: the training scale, 'S=256', 'S=384' or 'S=256-512' (Table 3); default S = 256."""
  config = default_config.get_config(arg)
  config.variant = 'E'
  config.init = 'glorot'
  return config
