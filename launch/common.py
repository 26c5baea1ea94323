"""What the launchers share: the --dry-run flag and reading main's flags."""

import os
import shlex
from typing import Optional, Sequence

from absl import flags

flags.DEFINE_bool('dry_run', False, 'Print what would run (commands, scripts) and run nothing.')
flags.DEFINE_alias('dry-run', 'dry_run')


def repo_dir() -> str:
  """The checkout the launchers belong to: what gets copied, where jobs `cd` to."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def workdir_of(main_args: Sequence[str]) -> Optional[str]:
  """The value of main's --workdir in `main_args` (the last one wins, as in absl)."""
  workdir = None
  for i, arg in enumerate(main_args):
    if arg.startswith('--workdir='):
      workdir = arg[len('--workdir='):]
    elif arg == '--workdir' and i + 1 < len(main_args):
      workdir = main_args[i + 1]
  return workdir


def is_remote(path: str) -> bool:
  """gs://... and friends: not on this machine's file system."""
  return '://' in path


# TensorFlow's GCS client tries a silent network 11 times, 60 s each (about 14 minutes, a hang
# to the user); the launchers only ask whether a file is there: 3 times, 10 s each (35 s).
GCS_BOUNDS = {'GCS_RETRY_CONFIG_MAX_RETRIES': '2', 'GCS_REQUEST_CONNECTION_TIMEOUT_SECS': '10',
              'GCS_REQUEST_IDLE_TIMEOUT_SECS': '10'}


class Unreachable(OSError):
  """Remote storage that could not be asked (network, credentials), in one line."""


def _tensorflow():
  """TensorFlow with GCS_BOUNDS where unset and no C++ warnings (its failed credentials probe,
  which Unreachable sums up): both are read at import. The environment is restored after, so
  the runs started from here keep TensorFlow's defaults."""
  saved = {k: os.environ.get(k) for k in (*GCS_BOUNDS, 'TF_CPP_MIN_LOG_LEVEL')}
  os.environ.update({k: v for k, v in GCS_BOUNDS.items() if saved[k] is None})
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return tf


def exists(path: str) -> bool:
  """os.path.exists, and tf.io.gfile for gs:// (TensorFlow only imported then: it is slow).

  Raises Unreachable when gs:// cannot answer, rather than TensorFlow's multi-line error.
  """
  if not is_remote(path):
    return os.path.exists(path)
  tf = _tensorflow()
  try:
    return tf.io.gfile.exists(path)
  except tf.errors.OpError as e:
    reason = ' '.join((e.message or type(e).__name__).split())
    raise Unreachable(reason if path in reason else f'{path}: {reason}') from e


def shell(command: Sequence[str]) -> str:
  """One command as a line a shell runs unchanged (for --dry-run and logs)."""
  return shlex.join(command)
