"""The main job end to end on the digits, resuming, and config validation."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import digits
from vgg_jax import checkpoints
from vgg_jax import config_validation
from vgg_jax import default_config
from vgg_jax import errors
from vgg_jax import protocol
from vgg_jax import steps
from vgg_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A narrow, fast net for the runs that only check bookkeeping.
TINY = ('--config.variant=A', '--config.width=0.0625', '--config.batch_size=128',
        '--config.log_every_steps=2', '--config.eval_every_steps=3',
        '--config.checkpoint_every_steps=100')


def run_main(workdir, data_dir, *overrides, check=True,
             devices=None) -> subprocess.CompletedProcess:
  """`python -m vgg_jax.main` in a fresh process, as a user would type it (on `devices` fake
  CPU devices if given, else on the one CPU)."""
  command = [sys.executable, '-m', 'vgg_jax.main', '--config=experiments/digits.py',
             f'--workdir={workdir}', f'--config.data_dir={data_dir}', *overrides]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if devices:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          check=False, timeout=600)
  if check:
    assert result.returncode == 0, result.stderr[-4000:]
  return result


def restored_params(workdir, config):
  state = steps.create_train_state(config, jax.random.key(0), config.image_size)
  manager = checkpoints.create_manager(str(workdir), config)
  restored = checkpoints.restore_latest(manager, state)
  return int(restored.step), jax.device_get(restored.params)


# The README's first command with constraints.txt's versions, 2 CPU cores: seeds 0-4 ended at
# 3.33, 2.50, 0.83, 0.83 and 1.39% top-1 error. A run is deterministic on one machine,
# but another CPU's kernels round differently and draw from that spread, so the range asserted
# is the seeds' widened by about a point each way (in %); outside the recorded versions only
# the 5% bound is.
DEFAULT_RUN_TOP1_RANGE = (0.3, 4.5)
# The packages whose versions decide the default run's numbers.
DECISIVE = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'tensorflow-cpu', 'tensorflow-datasets',
            'scikit-learn', 'pillow')


def recorded_versions_installed() -> bool:
  """Whether the DECISIVE packages are at constraints.txt's versions."""
  with open(os.path.join(REPO, 'constraints.txt')) as f:
    pinned = dict(line.strip().lower().replace('_', '-').split('==') for line in f
                  if '==' in line and not line.startswith('#'))
  return all(importlib.metadata.version(name) == pinned[name] for name in DECISIVE)


@pytest.mark.slow
def test_default_digits_run_reaches_five_percent_error(tmp_path, digits_config):
  """README command (a): a VGG-16 on the digits; held-out top-1 error <= 5%, and within
  DEFAULT_RUN_TOP1_RANGE where constraints.txt's versions are installed."""
  result = run_main(tmp_path, digits_config.data_dir)
  with open(tmp_path / 'eval_metrics.json') as f:
    metrics = json.load(f)
  assert set(metrics) == {'step', 'top1_error', 'top5_error', 'num_examples'}
  assert metrics['num_examples'] == 360
  assert metrics['step'] == 40 * (1437 // 64)
  assert 0.0 <= metrics['top5_error'] <= metrics['top1_error'] <= 0.05
  if recorded_versions_installed():
    low, high = DEFAULT_RUN_TOP1_RANGE
    assert low <= 100 * metrics['top1_error'] <= high, metrics
  assert sorted(os.listdir(tmp_path / 'checkpoints'))[-1] == str(metrics['step'])
  assert any(name.startswith('events') for name in os.listdir(tmp_path / 'tensorboard'))
  for words in ('img/s', 'ETA', 'loss', 'top-5 err', 'Final held-out test'):
    assert words in result.stderr


@pytest.mark.slow
def test_resumed_run_ends_with_the_parameters_of_an_uninterrupted_run(tmp_path, digits_config):
  """7 steps, then a fresh process resuming for 7 more, equals 14 steps straight, bitwise.

  The 14 steps cross an epoch boundary (11 steps of 128) and two plateau evaluations, so data
  order, augmentation draws, dropout keys and the LR state all have to continue exactly.
  """
  straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
  run_main(straight, digits_config.data_dir, *TINY, '--config.num_train_steps=14')
  run_main(interrupted, digits_config.data_dir, *TINY, '--config.num_train_steps=7')
  resumed = run_main(interrupted, digits_config.data_dir, *TINY, '--config.num_train_steps=14')
  assert 'Resumed from' in resumed.stderr and 'at step 7' in resumed.stderr

  config = digits.get_config()
  config.variant, config.width = 'A', 0.0625
  step_a, params_a = restored_params(straight, config)
  step_b, params_b = restored_params(interrupted, config)
  assert step_a == step_b == 14
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  initial = jax.device_get(steps.create_train_state(config, jax.random.key(0), 32).params)
  assert not np.array_equal(params_a['conv1_1']['kernel'], initial['conv1_1']['kernel'])


def test_bad_config_fails_before_anything_is_written(tmp_path, digits_config):
  result = run_main(tmp_path / 'run', digits_config.data_dir, '--config.variant=F', check=False)
  assert result.returncode != 0
  assert "config.variant='F'" in result.stderr and 'A-LRN' in result.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_class_count_mismatch_names_the_dataset_classes(tmp_path, digits_config):
  config = digits_config.copy_and_resolve_references()
  config.num_classes = 1000
  with pytest.raises(errors.ConfigError, match=r'num_classes=1000.*10 classes'):
    train.train_and_evaluate(config, str(tmp_path))


BAD_CONFIGS = [
    ('variant', 'F', 'expected one of A, A-LRN, B, C, D, E'),
    ('init', 'he', 'paper, glorot'),
    ('dtype', 'float8', 'float32, bfloat16'),
    ('train_scale', (512, 256), 'Smin=512 > Smax=256'),
    ('train_scale', 'big', 'int S or a pair'),
    ('image_size', 100, 'multiple of 32'),
    ('image_size', 288, 'larger than the smallest training scale S=256'),
    ('eval_scale', 200, 'smaller than image_size=224'),
    ('batch_size', 60, 'multiple of the 8 devices'),
    ('eval_batch_size', 4, 'multiple of the 8 devices'),
    ('learning_rate', -0.1, 'must be positive'),
    ('momentum', 1.5, r'\[0, 1\)'),
    ('weight_decay', -1.0, '>= 0'),
    ('dropout_rate', 1.0, r'\[0, 1\)'),
    ('width', 0.0, 'positive'),
    ('lr_plateau_factor', 2.0, r'\(0, 1\)'),
    ('test_scales', (200, 256), 'each Q must be an int >= image_size=224'),
    ('dense_batch_size', 12, 'multiple of the 8 devices'),
    ('multicrop_batch_size', 0, 'multiple of the 8 devices'),
    ('dense_size_step', 0, 'must be positive'),
    ('dense_max_aspect', 0.5, '>= 1'),
]


@pytest.mark.parametrize('field,value,why', BAD_CONFIGS)
def test_invalid_config_error_names_field_and_value(field, value, why):
  config = default_config.get_config()
  config[field] = value
  with pytest.raises(errors.ConfigError) as error:
    config_validation.validate(config, num_devices=8)
  message = str(error.value)
  assert message.startswith(f'config.{field}={value!r}:'), message
  assert re.search(why, message), message


def test_unknown_eval_protocol_error_names_the_field_and_the_valid_ones():
  config = default_config.get_config()
  config.eval_protocols = 'dense,tencrop'
  with pytest.raises(errors.ConfigError,
                     match=r"^config.eval_protocols='dense,tencrop': expected .*multicrop"):
    config_validation.validate(config, num_devices=8)


def test_paper_config_is_valid_and_reads_like_sec_3_1():
  config = default_config.get_config()
  config_validation.validate(config, num_devices=8)
  assert (config.batch_size, config.momentum, config.weight_decay) == (256, 0.9, 5e-4)
  assert (config.learning_rate, config.lr_plateau_factor, config.lr_max_decreases) == (
      0.01, 0.1, 3)
  assert (config.num_epochs, config.dropout_rate, config.image_size) == (74, 0.5, 224)
  assert protocol.scale_bounds(config.train_scale) == (256, 256)
  assert protocol.scale_bounds((256, 512)) == (256, 512)
