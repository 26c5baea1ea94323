"""What the command-line entry points share: set-up before their work, reading the Python
files named on their command lines (configs, grids), one-line errors, and a quick exit."""

import atexit
import difflib
import importlib.util
import logging as std_logging
import os
import sys
import threading
from types import ModuleType
from typing import Optional

# Before TensorFlow is first imported, which the entry points do after importing this. Its
# oneDNN kernels replace none of the image ops the input pipeline runs (the streams' bytes
# are the same either way); left on, TensorFlow announces them on every command, before its
# log level applies. A user's own setting wins.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

# Libraries whose INFO lines are chatter for a vgg_jax run: Orbax and tfds log every file they
# touch, JAX that this machine has no TPU.
CHATTY = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/xla_bridge.py')
# Warnings that describe a library's workings rather than a problem of the run: tfds names
# the builder config of every folder dataset it prepares, and that a dataset it is about to
# prepare has no dataset_info.json yet.
BENIGN_WARNINGS = ('Using custom data configuration', 'Variant folder ')
# Flag-parsing errors start as absl's do.
FLAGS_ERROR = 'FATAL Flags parsing error'
# What a process stopped by Ctrl-C exits with, as a shell reports it (128 + SIGINT).
INTERRUPTED = 130


def _quiet_libraries(record) -> bool:
  """Keeps every warning but the benign ones, and the libraries' INFO lines, only with
  --verbosity=1 or more."""
  if logging.get_verbosity() > logging.INFO:
    return True
  if record.levelno >= std_logging.WARNING:
    return not str(record.msg).startswith(BENIGN_WARNINGS)
  return not any(part in record.pathname for part in CHATTY)


def setup() -> None:
  logging.get_absl_handler().addFilter(_quiet_libraries)
  # tf.data runs on the CPU; keep TensorFlow off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
  if logging.get_verbosity() <= logging.INFO:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()


def load_file(path: str) -> ModuleType:
  """The Python file at `path` run as a module: config files and grids need not be in a
  package. ValueError if it is not a Python file."""
  name = '_vgg_jax_file_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise ValueError(f'{path}: not a Python file.')
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up while being defined.
  spec.loader.exec_module(module)
  return module


# ---------------------------------------------------------------------------------------------
# --config=FILE[:ARG] and --config.FIELD=VALUE, checked before absl parses them: a missing
# file, a failing get_config and a mistyped field in one line, with the names they are near,
# rather than absl's chained traceback; and before JAX and TensorFlow are imported.


def _config_arg(argv: list[str]) -> Optional[str]:
  """The FILE[:ARG] of the last --config=FILE[:ARG] (or --config FILE[:ARG]) in argv, if any."""
  values = []
  for i, argument in enumerate(argv):
    name, equals, value = argument.partition('=')
    if name in ('--config', '-config'):
      values.append(value if equals else (argv[i + 1] if i + 1 < len(argv) else None))
  return values[-1] if values else None


def _near(name: str, candidates, folder: str = '') -> str:
  near = difflib.get_close_matches(name, sorted(candidates), n=3)
  return f' Did you mean {" or ".join(os.path.join(folder, n) for n in near)}?' if near else ''


def _config_fields(config_arg: str) -> set[str]:
  """The fields of the config FILE[:ARG]; exits in one line if the file is missing or its
  get_config fails (a bad ARG, an error in the file)."""
  path, _, arg = config_arg.partition(':')
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or '.'
    candidates = [n for n in os.listdir(folder) if n.endswith('.py') and n[0] != '_'] if (
        os.path.isdir(folder)) else []
    sys.exit(f'{FLAGS_ERROR}: --config={config_arg}: no such file.'
             f'{_near(os.path.basename(path), candidates, folder)}')
  try:
    module = load_file(path)
    return set((module.get_config(arg) if arg else module.get_config()).keys())
  except Exception as e:  # pylint: disable=broad-except  # Whatever the file raises, said once.
    sys.exit(f'{FLAGS_ERROR}: --config={config_arg}: {type(e).__name__}: {e}')


def parse_flags_with_config(argv: list[str]) -> list[str]:
  """absl's parsing, for an entry point with a --config flag, after `--config` and the
  `--config.FIELD=...` overrides are checked."""
  config_arg = _config_arg(argv)
  if config_arg is not None:
    fields = _config_fields(config_arg)
    for argument in argv:
      if argument.startswith('--config.'):
        name, _, value = argument[len('--config.'):].partition('=')
        field = name.split('.')[0]
        if field not in fields:
          sys.exit(f'{FLAGS_ERROR}: --config.{name}={value}: {config_arg} has no field '
                   f'{field!r}.{_near(field, fields)}')
  return app.parse_flags_with_usage(argv)


def integers(flag) -> Optional[list[int]]:
  """A list flag's values as ints (None when unset); an app.UsageError naming it otherwise."""
  if not flag.value:
    return None
  try:
    return [int(value) for value in flag.value]
  except ValueError:
    raise app.UsageError(f'--{flag.name}={",".join(flag.value)}: expected integers, e.g. '
                         f'--{flag.name}=256,384,512.') from None


# ---------------------------------------------------------------------------------------------
# Running and ending a command.


def _tool() -> str:
  """The command's name, e.g. 'vgg_jax.evaluate'."""
  spec = getattr(sys.modules['__main__'], '__spec__', None)
  return spec.name if spec else os.path.basename(sys.argv[0])


def _one_line_usage_errors(main):
  """`main`, whose app.UsageError (a bad flag value) ends the command with its one line
  rather than absl's usage text (the module's docstring and every flag) before it."""

  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      sys.exit(f'{_tool()}: {e}')

  return wrapped


def run(main, **kwargs) -> None:
  """`absl.app.run(main)`, with one-line usage errors and Ctrl-C, then a quick exit.

  The exit skips the interpreter's teardown of TensorFlow's modules, which costs seconds
  every run of every command (BENCHMARKS.md, section 7). What a normal exit does before that
  teardown is done first, in its order: the program's threads are stopped and joined
  (Orbax's writes end; `threading._shutdown` is what Python's own exit calls, and the only
  way to stop the idle workers of concurrent.futures pools), then the exit handlers run (JAX,
  logging and file flushes).
  """
  try:
    app.run(_one_line_usage_errors(main), **kwargs)
    code = 0
  except SystemExit as e:
    code = e.code
  except KeyboardInterrupt:  # One the command's own handling did not catch.
    print(f'{_tool()}: aborted (Ctrl-C).', file=sys.stderr)
    code = INTERRUPTED
  threading._shutdown()  # pylint: disable=protected-access
  if code is not None and not isinstance(code, int):
    print(code, file=sys.stderr)
    code = 1
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code or 0)  # pylint: disable=protected-access
