"""Shared test set-up: 8 fake CPU devices, the digits dataset built once, real photos."""

import os
import shutil
import tempfile

# Before jax is imported anywhere: 8 CPU devices stand in for 8 accelerators.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# JAX's persistent compilation cache, shared by this session and the runs it starts: the same
# small nets are built by many tests, and a cached executable computes exactly what a fresh
# compilation does.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE_DIR = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='vgg_jax_test_compilation_cache_')
else:
  _CACHE_DIR = None

try:
  # torch, where installed (tests/test_convert.py compares with it), must be imported before
  # TensorFlow, which other test modules import: the other order crashes the process.
  import torch  # pylint: disable=g-import-not-at-top,unused-import
  import torchvision  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  pass
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from experiments import digits  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session')
def digits_config(tmp_path_factory):
  """The digits experiment config, its tfds data_dir built once per test session."""
  from vgg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.data_dir = str(tmp_path_factory.mktemp('tensorflow_datasets'))
  # Never the user's cache, should a test need a copy of a split to read by index.
  config.random_access_dir = str(tmp_path_factory.mktemp('random_access'))
  input_pipeline.get_builder(config)
  return config


@pytest.fixture(scope='session')
def photos() -> dict[str, np.ndarray]:
  """Real RGB photographs bundled by scikit-image and scikit-learn, landscape and portrait."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  sample = datasets.load_sample_images()
  images = {
      'astronaut': skimage.data.astronaut(),  # 512x512
      'coffee': skimage.data.coffee(),  # 400x600
      'chelsea': skimage.data.chelsea(),  # 300x451
      'china': sample.images[0],  # 427x640
      'flower': sample.images[1],  # 427x640
  }
  images['coffee_portrait'] = np.ascontiguousarray(np.transpose(images['coffee'], (1, 0, 2)))
  return images


@pytest.fixture(scope='session')
def photos_config(tmp_path_factory, digits_config):
  """A narrow net D config on `photo_dataset.TestPhotos`: 13 real photos, many aspect ratios."""
  from vgg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from tests import photo_dataset  # pylint: disable=g-import-not-at-top,unused-import
  config = digits_config.copy_and_resolve_references()
  config.dataset = 'test_photos'
  config.eval_split = 'validation'
  config.num_classes = 3
  config.data_dir = str(tmp_path_factory.mktemp('photos_tfds'))
  config.train_scale = (64, 96)
  config.image_size = 64
  config.dense_batch_size = 8
  config.multicrop_batch_size = 8
  config.dense_size_step = 32
  config.dense_max_aspect = 2.0
  config.cache = False
  input_pipeline.get_builder(config)
  return config


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _CACHE_DIR:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
