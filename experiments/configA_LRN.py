"""Net A-LRN: A with AlexNet's local response normalisation after conv1_1 (Table 1)."""

from experiments import default


def get_config():
  config = default.get_config()
  config.variant = 'A-LRN'
  return config
