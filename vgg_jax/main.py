"""Trains and evaluates a VGG net: `python -m vgg_jax.main --config=FILE --workdir=DIR`.

Config fields are overridden on the command line, e.g. `--config.batch_size=64`. JAX,
TensorFlow and the training code are imported once the flags are read, so a mistyped flag is
reported within a second rather than after some ten seconds of imports.
"""

import difflib
import os
import sys
from typing import Optional

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


def _config_arg(argv: list[str]) -> Optional[str]:
  """The FILE[:ARG] of the last --config=FILE[:ARG] (or --config FILE[:ARG]) in argv, if any."""
  values = []
  for i, argument in enumerate(argv):
    name, equals, value = argument.partition('=')
    if name in ('--config', '-config'):
      values.append(value if equals else (argv[i + 1] if i + 1 < len(argv) else None))
  return values[-1] if values else None


def _config_file_fields(config_arg: str):
  """The fields of the config FILE[:ARG]; None if unreadable (absl then reports the problem
  itself)."""
  path, _, arg = config_arg.partition(':')
  try:
    module = cli.load_file(path)
    return set((module.get_config(arg) if arg else module.get_config()).keys())
  except Exception:  # pylint: disable=broad-except
    return None


def _check_config_file(config_arg: str) -> None:
  """One line, not absl's chained traceback, when --config names no file."""
  path = config_arg.partition(':')[0]
  if os.path.isfile(path):
    return
  folder = os.path.dirname(path) or '.'
  candidates = []
  if os.path.isdir(folder):
    candidates = sorted(n for n in os.listdir(folder) if n.endswith('.py') and n[0] != '_')
  near = difflib.get_close_matches(os.path.basename(path), candidates, n=3)
  hint = f' Did you mean {" or ".join(os.path.join(folder, n) for n in near)}?' if near else ''
  sys.exit(f'FATAL Flags parsing error: --config={config_arg}: no such file.{hint}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a missing config file or a mistyped config field named as such,
  with the names it is near."""
  config_arg = _config_arg(argv)
  if config_arg is not None:
    _check_config_file(config_arg)
    fields = _config_file_fields(config_arg)
    for argument in argv:
      if fields is not None and argument.startswith('--config.'):
        name, _, value = argument[len('--config.'):].partition('=')
        field = name.split('.')[0]
        if field not in fields:
          close = difflib.get_close_matches(field, sorted(fields), n=3)
          sys.exit(f'FATAL Flags parsing error: --config.{name}={value}: {config_arg} has no '
                   f'field {field!r}.' + (f' Did you mean {" or ".join(close)}?' if close else ''))
  return app.parse_flags_with_usage(argv)


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
  cli.run(main, flags_parser=parse_flags)
