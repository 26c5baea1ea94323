"""Trains and evaluates a VGG net: `python -m vgg_jax.main --config=FILE --workdir=DIR`.

Config fields are overridden on the command line, e.g. `--config.batch_size=64`.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vgg_jax import cli
from vgg_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and eval_metrics.json.')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  cli.setup()
  logging.info('JAX %s: process %d of %d, %d local device(s): %s', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.local_devices()[0].device_kind)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
