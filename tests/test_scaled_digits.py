"""scaled_digits: real digits at random scales and places, the miniature's ImageNet stand-in."""

import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from vgg_jax import datasets  # pylint: disable=unused-import  # Registers the builders.
from vgg_jax.datasets import scaled_digits
from vgg_jax.datasets import sklearn_digits


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """The examples each config's builder generates (tests/test_reproduction.py reads them back
  through tfds and tf.data)."""
  data_dir = str(tmp_path_factory.mktemp('scaled_digits'))
  out = {}
  for config in ('all', '5to9'):
    builder = tfds.builder(f'scaled_digits/{config}', data_dir=data_dir)
    out[config] = {split: [example for _, example in examples]
                   for split, examples in builder._split_generators(None).items()}  # pylint: disable=protected-access
  return out


def test_splits_hold_four_and_three_drawings_of_each_digit_of_sklearns_split(built):
  targets = sk_datasets.load_digits().target
  split = sklearn_digits.split_indices(targets)
  assert not set(split['train']) & set(split['test'])
  assert len(split['train']) + len(split['test']) == 1797
  for name, copies in (('train', 4), ('test', 3)):
    labels = np.array([ex['label'] for ex in built['all'][name]])
    assert len(labels) == copies * len(split[name]) == {'train': 5748, 'test': 1080}[name]
    np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                  copies * np.bincount(targets[split[name]], minlength=10))
    assert all(ex['image'].shape == (64, 64, 3) and ex['image'].dtype == np.uint8
               for ex in built['all'][name])


def test_digits_5_to_9_are_the_same_drawings_labelled_0_to_4(built):
  digest = lambda ex: hashlib.sha1(ex['image'].tobytes()).hexdigest()
  for split in ('train', 'test'):
    expected = sorted((digest(ex), int(ex['label']) - 5) for ex in built['all'][split]
                      if ex['label'] >= 5)
    subset = sorted((digest(ex), int(ex['label'])) for ex in built['5to9'][split])
    assert subset == expected


def test_the_digits_side_spans_half_to_the_whole_canvas(built):
  """The ink's bounding box, found by threshold (ink 190-255 over a 0-60 ground, noise std 6),
  varies about two-fold, as DIGIT_FRACTION (0.5, 1.0) says: object scale varies."""
  sides = []
  for ex in built['all']['test']:
    ink = ex['image'].mean(axis=-1) > 150
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    sides.append(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)
  sides = np.array(sides) / scaled_digits.CANVAS
  assert np.percentile(sides, 5) < 0.6 and np.percentile(sides, 95) > 0.85
  assert sides.max() <= 1.0
  # A digit's 8x8 strokes rarely touch their frame on every side: the box is a lower bound.
  assert np.percentile(sides, 95) / np.percentile(sides, 5) > 1.5
