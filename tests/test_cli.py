"""The command lines' shared set-up: which library lines a run shows."""

import logging as std_logging

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
