"""What every command-line entry point (`main`, `evaluate`) does before its work."""

import logging as std_logging

from absl import logging


def _quiet_libraries(record) -> bool:
  """Orbax and tfds log every file they touch at INFO; keep their warnings, drop the chatter."""
  return record.levelno >= std_logging.WARNING or not any(
      part in record.pathname for part in ('/orbax/', '/tensorflow_datasets/'))


def setup() -> None:
  logging.get_absl_logger().addFilter(_quiet_libraries)
  # tf.data runs on the CPU; keep TensorFlow off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
