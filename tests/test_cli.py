"""The command lines' shared set-up: which library lines a run shows, and how they exit."""

import logging as std_logging
import os
import re
import subprocess
import sys

from absl import logging
import pytest

from vgg_jax import cli


def record(pathname: str, level: int, message: str) -> std_logging.LogRecord:
  return std_logging.LogRecord('absl', level, pathname, 1, message, None, None)


ORBAX = '/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py'
TFDS = '/venv/lib/python3.11/site-packages/tensorflow_datasets/core/dataset_builder.py'
OURS = '/repo/vgg_jax/train.py'


@pytest.fixture
def verbosity():
  before = logging.get_verbosity()
  yield logging.set_verbosity
  logging.set_verbosity(before)


def test_by_default_library_info_and_benign_warnings_are_hidden_and_the_rest_shown(verbosity):
  verbosity(logging.INFO)
  shown = {
      (ORBAX, std_logging.INFO, 'Saving item to /w/checkpoints/100'): False,
      (TFDS, std_logging.INFO, 'Load dataset info from /data'): False,
      (TFDS, std_logging.WARNING, 'Using custom data configuration: a_b_c'): False,
      (TFDS, std_logging.WARNING, 'Dataset is using deprecated text encoder API'): True,
      (ORBAX, std_logging.ERROR, 'Failed to save checkpoint'): True,
      (OURS, std_logging.INFO, 'step 2/7: loss 2.84'): True,
  }
  for (path, level, message), expected in shown.items():
    assert cli._quiet_libraries(record(path, level, message)) == expected, message  # pylint: disable=protected-access


def test_verbosity_1_shows_every_line(verbosity):
  verbosity(logging.DEBUG)
  for path, level, message in [(ORBAX, std_logging.INFO, 'Saving item'),
                               (TFDS, std_logging.WARNING, 'Using custom data configuration: x')]:
    assert cli._quiet_libraries(record(path, level, message))  # pylint: disable=protected-access


# A command line whose work ends in a thread still writing and an exit handler still to run,
# as a run's last checkpoint write and JAX's clean-up do.
EXITING = """
import atexit, sys, threading, time
from vgg_jax import cli
OUT = sys.argv[1]

def write(name, delay):
  time.sleep(delay)
  with open(OUT + name, 'w') as f:
    f.write('done')

def main(argv):
  atexit.register(write, '.atexit', 0.0)
  threading.Thread(target=write, args=('.thread', 1.0)).start()
  if argv[2] == 'fail':
    sys.exit('tool: no such workdir')
  print('printed', end='')

cli.run(main)
"""


@pytest.mark.parametrize('outcome', ['ok', 'fail'])
def test_quick_exit_waits_for_threads_runs_exit_handlers_and_keeps_the_exit_code(
    tmp_path, outcome):
  out = str(tmp_path / 'out')
  result = subprocess.run([sys.executable, '-c', EXITING, out, outcome], capture_output=True,
                          text=True, timeout=60, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert open(out + '.thread').read() == 'done'
  assert open(out + '.atexit').read() == 'done'
  if outcome == 'ok':
    assert (result.returncode, result.stdout) == (0, 'printed')
  else:
    assert result.returncode == 1 and result.stderr.strip() == 'tool: no such workdir'


@pytest.fixture(scope='module')
def imported_net(tmp_path_factory):
  """A workdir holding a tiny net whose config names imagenet2012, as an imported net's does."""
  import jax  # pylint: disable=g-import-not-at-top
  from vgg_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from vgg_jax import default_config  # pylint: disable=g-import-not-at-top
  from vgg_jax import models  # pylint: disable=g-import-not-at-top
  from vgg_jax import steps  # pylint: disable=g-import-not-at-top
  config = default_config.get_config()
  config.update(variant='A', width=1 / 16, image_size=32, train_scale=32)
  params = steps.init_params(models.create_model(config), jax.random.key(0),
                             jax.numpy.zeros((1, 32, 32, 3)))
  workdir = str(tmp_path_factory.mktemp('imported') / 'net')
  checkpoints.save_params(workdir, params, config)
  return workdir


def test_bad_arguments_end_each_command_in_its_one_line_and_nothing_else(imported_net,
                                                                         tmp_path):
  """No usage text, traceback or TensorFlow notice before the line; the line names what the
  command takes (`--manual_dir`, not main's `--config.manual_dir`)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  net, empty = imported_net, str(tmp_path / 'tfds')
  cases = {
      ('vgg_jax.evaluate', f'--workdir={net}', f'--data_dir={empty}'):
          r'^vgg_jax\.evaluate: config\.manual_dir=None: imagenet2012 is not prepared .* pass '
          r'it as --manual_dir=DIR\.$',
      ('vgg_jax.evaluate', f'--workdir={net}', '--scales=20'):
          r'^vgg_jax\.evaluate: Test scales 20 are smaller than the 32-pixel training crop',
      ('vgg_jax.evaluate', f'--workdir={net}', '--protocol=tencrop'):
          r"^vgg_jax\.evaluate: --protocol='tencrop': expected \"all\" or",
      ('vgg_jax.linear_probe', f'--workdir={net}', '--dataset=sklearn_digits', '--scales=a'):
          r'^vgg_jax\.linear_probe: --scales=a: expected integers, e\.g\. --scales=256',
      ('vgg_jax.main', '--config=experiments/configD.py:S=999', f'--workdir={tmp_path}'):
          r"^FATAL Flags parsing error: --config=experiments/configD.py:S=999: ValueError: "
          r"Config argument 'S=999': expected one of S=256, S=384, S=256-512",
  }
  env = {k: v for k, v in os.environ.items() if not k.startswith('TF_')}
  runs = {case: subprocess.Popen([sys.executable, '-m', *case], cwd=repo, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for case in cases}
  for case, pattern in cases.items():
    _, err = runs[case].communicate(timeout=300)
    assert runs[case].returncode == 1, (case, err[-3000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), (case, err[-3000:])
