"""What the command-line entry points share: set-up before their work, reading the Python
files named on their command lines (configs, grids), and a quick exit."""

import atexit
import importlib.util
import logging as std_logging
import os
import sys
import threading
from types import ModuleType

from absl import app
from absl import logging


# Libraries whose INFO lines are chatter for a vgg_jax run: Orbax and tfds log every file they
# touch, JAX that this machine has no TPU.
CHATTY = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/xla_bridge.py')
# Warnings that describe a library's workings rather than a problem of the run: tfds names
# the builder config of every folder dataset it prepares.
BENIGN_WARNINGS = ('Using custom data configuration',)


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


def run(main, **kwargs) -> None:
  """`absl.app.run(main)`, then an exit that skips the interpreter's teardown of TensorFlow's
  modules (2-3 s a process on CPU, every run of every command). What a normal exit does
  before that teardown is done first, in its order: the program's threads are stopped and joined
  (Orbax's writes end), then the exit handlers run (JAX, logging and file flushes)."""
  try:
    app.run(main, **kwargs)
    code = 0
  except SystemExit as e:
    code = e.code
  threading._shutdown()  # pylint: disable=protected-access
  if code is not None and not isinstance(code, int):
    print(code, file=sys.stderr)
    code = 1
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code or 0)  # pylint: disable=protected-access
