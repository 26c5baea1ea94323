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


def exists(path: str) -> bool:
  """os.path.exists, and tf.io.gfile for gs:// (TensorFlow only imported then: it is slow)."""
  if not is_remote(path):
    return os.path.exists(path)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile.exists(path)


def shell(command: Sequence[str]) -> str:
  """One command as a line a shell runs unchanged (for --dry-run and logs)."""
  return shlex.join(command)
