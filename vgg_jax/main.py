"""Trains and evaluates a VGG net: `python -m vgg_jax.main --config=FILE --workdir=DIR`.

Config fields are overridden on the command line, e.g. `--config.batch_size=64`.
"""

import logging as std_logging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from vgg_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and eval_metrics.json.')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_libraries(record) -> bool:
  """Orbax and tfds log every file they touch at INFO; keep their warnings, drop the chatter."""
  return record.levelno >= std_logging.WARNING or not any(
      part in record.pathname for part in ('/orbax/', '/tensorflow_datasets/'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.get_absl_logger().addFilter(_quiet_libraries)
  # tf.data runs on the CPU; keep TensorFlow off the accelerators JAX uses.
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
  logging.info('JAX %s: process %d of %d, %d local device(s): %s', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.local_devices()[0].device_kind)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
