"""Net A (11 weight layers), Table 1; the net the paper trains from random N(0, 0.01^2)."""

from experiments import default


def get_config():
  config = default.get_config()
  config.variant = 'A'
  return config
