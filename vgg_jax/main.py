"""Trains and evaluates a VGG net: `python -m vgg_jax.main --config=FILE --workdir=DIR`.

Config fields are overridden on the command line, e.g. `--config.batch_size=64`. JAX,
TensorFlow and the training code are imported once the flags are read (`cli` checks the
config file and fields first), so a mistyped flag is reported within a second rather than
after some ten seconds of imports. Kept short on purpose, as flax's examples keep theirs.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vgg_jax import cli
from vgg_jax import errors

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and eval_metrics.json.')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for several '
                    'processes (launch/local.py sets it); unset: auto-detected on SLURM and '
                    'Cloud TPU pods.')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process\'s index in a multi-process run.')


def initialize_distributed() -> None:
  """Joins JAX's multi-process runtime when this is one of several processes.

  With explicit flags (local multi-process runs); on SLURM with several tasks and on
  multi-host Cloud TPU VMs, jax.distributed detects the cluster itself. CPU processes
  exchange collectives through gloo.
  """
  import jax  # pylint: disable=g-import-not-at-top
  explicit = (FLAGS.num_processes or 1) > 1
  slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  tpu_pod = len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1
  if not (explicit or slurm or tpu_pod):
    return
  # Only the CPU backend reads this; accelerators keep their own collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  else:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  initialize_distributed()
  cli.setup()
  import jax  # pylint: disable=g-import-not-at-top
  from vgg_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from vgg_jax import train  # pylint: disable=g-import-not-at-top
  logging.info('JAX %s: process %d of %d, %d local device(s): %s', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.local_devices()[0].device_kind)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (errors.ConfigError, train.NonFiniteError,
          checkpoints.CheckpointWriteError) as e:
    sys.exit(f'vgg_jax.main: {e}')
  except KeyboardInterrupt:
    sys.exit(f'vgg_jax.main: aborted (Ctrl-C); the checkpoints already in {FLAGS.workdir} are '
             'whole: run the same command again to resume from the newest.')


if __name__ == '__main__':
  # Here, not at import: importing this module must not make its flags required elsewhere.
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main, flags_parser=cli.parse_flags_with_config)
