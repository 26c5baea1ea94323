"""The input pipeline: Sec. 3.1's training transform, Sec. 3.2's test crop, batches, resumption.

Every check compares with a reference computed here: PIL resizes, numpy windows, the AlexNet PCA
constants written out, scikit-learn's own digits and split, binomial and chi-square bounds.
"""

import collections
import hashlib
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
import pytest
from scipy import stats
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments.mini import config as mini
from vgg_jax import errors
from vgg_jax import input_pipeline
from vgg_jax import preprocess
from vgg_jax import protocol
from vgg_jax import steps
from vgg_jax.datasets import random_access

NUM_DEVICES = 8
IMAGE_SIZE = 224
MEAN_RGB = np.array([123.68, 116.779, 103.939])
NORMALIZATION = preprocess.Normalization(tuple(MEAN_RGB))
# AlexNet's PCA of ILSVRC RGB pixels in [0, 1] (Krizhevsky et al. 2012, Sec. 4.1), written out.
PAPER_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
PAPER_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                         [-0.5808, -0.0045, -0.8140],
                         [-0.5836, -0.6948, 0.4203]])
DIGITS_TRAIN, DIGITS_TEST = 1437, 360


def fresh_seed() -> int:
  return int.from_bytes(os.urandom(4), 'little')


def fresh_tf_seeds(n: int) -> np.ndarray:
  """n independent stateless tf seeds, (n, 2) int64, from the OS's entropy."""
  return np.frombuffer(os.urandom(16 * n), np.int64).reshape(n, 2).copy()


def png(image: np.ndarray) -> tf.Tensor:
  return tf.io.encode_png(tf.constant(image))


def jpeg(image: np.ndarray) -> tf.Tensor:
  return tf.io.encode_jpeg(tf.constant(image), quality=95)


def rescaled_uint8(encoded: tf.Tensor, smallest_side: int) -> np.ndarray:
  return input_pipeline.to_uint8(
      input_pipeline.rescale(input_pipeline.decode(encoded), smallest_side)).numpy()


def window_offsets(big: np.ndarray, crop: np.ndarray) -> list[tuple[int, int]]:
  """Every (top, left) where `crop` is exactly a window of `big`; numpy only."""
  h, w = crop.shape[:2]
  top_rows = big[:big.shape[0] - h + 1]
  first_rows = sliding_window_view(top_rows, (w, 3), axis=(1, 2))[:, :, 0]  # (dy, dx, w, 3)
  candidates = np.argwhere(np.all(first_rows == crop[0], axis=(-2, -1)))
  return [(int(dy), int(dx)) for dy, dx in candidates
          if np.array_equal(big[dy:dy + h, dx:dx + w], crop)]


def map_seeds(fn, seeds: np.ndarray) -> np.ndarray:
  """fn(seed) for every seed, through tf.data (fast, parallel), stacked."""
  ds = tf.data.Dataset.from_tensor_slices(seeds).map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  return np.stack(list(tfds.as_numpy(ds)))


def binomial_bounds(n: int, p: float, sigmas: float = 6.0) -> tuple[float, float]:
  sd = math.sqrt(n * p * (1 - p))
  return n * p - sigmas * sd, n * p + sigmas * sd


# ---------------------------------------------------------------------------------------------
# Digits fixtures and independent references.


def config_copy(digits_config, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(digits_config.to_dict())
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def builder(digits_config):
  return input_pipeline.get_builder(digits_config)


@pytest.fixture(scope='module')
def sklearn_split():
  """scikit-learn's digits and its stratified 80/20 split, computed here."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  train, test = model_selection.train_test_split(
      np.arange(len(digits.target)), test_size=0.2, stratify=digits.target, random_state=0)
  return digits, {'train': np.sort(train), 'test': np.sort(test)}


@pytest.fixture(scope='module')
def stored_examples(builder):
  """The builder's splits as stored, read with tfds alone: {split: (images, labels)}."""
  out = {}
  for split in ('train', 'test'):
    examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
    out[split] = (np.stack([e['image'] for e in examples]),
                  np.array([e['label'] for e in examples]))
  return out


def class_counts(labels) -> np.ndarray:
  return np.bincount(np.asarray(labels).ravel(), minlength=10)


def example_multiset(images, labels) -> collections.Counter:
  return collections.Counter((img.tobytes(), int(lab)) for img, lab in zip(images, labels))


# ---------------------------------------------------------------------------------------------
# Decode, rescale, the transforms' output.


def test_decode_gives_the_encoded_rgb_pixels_and_repeats_grey_to_rgb(photos):
  photo = photos['chelsea']
  np.testing.assert_array_equal(input_pipeline.decode(png(photo)).numpy(), photo)
  grey = photo[..., 1:2]
  decoded = input_pipeline.decode(png(grey)).numpy()
  assert decoded.shape == photo.shape[:2] + (3,) and decoded.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(decoded[..., c], grey[..., 0])


@pytest.mark.parametrize('scale', [256, (256, 512)], ids=['fixed', 'jittered'])
def test_transforms_give_image_size_square_uint8_rgb_for_every_photo(photos, scale):
  seeds = fresh_tf_seeds(len(photos))
  eval_q = scale if isinstance(scale, int) else (scale[0] + scale[1]) // 2
  for (name, photo), seed in zip(photos.items(), seeds):
    encoded = jpeg(photo)
    bounds = (scale, scale) if isinstance(scale, int) else scale
    for flip in (False, True):
      train = input_pipeline.train_transform(encoded, tf.constant(seed), scale=bounds,
                                             image_size=IMAGE_SIZE, flip=flip)
      assert train.shape == (IMAGE_SIZE, IMAGE_SIZE, 3), name
      assert train.dtype == tf.uint8, name
    test = input_pipeline.eval_transform(encoded, scale=eval_q, image_size=IMAGE_SIZE)
    assert test.shape == (IMAGE_SIZE, IMAGE_SIZE, 3), name
    assert test.dtype == tf.uint8, name


@pytest.mark.parametrize('smallest_side', [224, 256, 384, 512])
def test_rescale_makes_smallest_side_s_and_keeps_aspect_ratio(photos, smallest_side):
  for name, photo in photos.items():
    h, w = photo.shape[:2]
    out = input_pipeline.rescale(tf.constant(photo), smallest_side)
    assert out.dtype == tf.float32
    oh, ow = out.shape[:2]
    assert min(oh, ow) == smallest_side, (name, out.shape)
    assert (oh >= ow) == (h >= w), f'{name}: orientation changed {photo.shape} -> {out.shape}'
    short, long = min(h, w), max(h, w)
    expected_long = round(long * smallest_side / short)
    assert abs(max(oh, ow) - expected_long) <= 1, (name, out.shape, expected_long)


def test_rescaled_shape_is_the_same_rule_in_python_and_in_tensorflow():
  """inference rescales photos with protocol.rescaled_shape, the pipeline with its TF form."""
  rng = np.random.default_rng(0)
  shapes = [(h, w) for h, w in rng.integers(17, 1200, size=(300, 2))] + [(300, 300), (1, 5)]
  for height, width in shapes:
    for side in (32, 36, 224, 256, 384, 512):
      expected = protocol.rescaled_shape(int(height), int(width), side)
      got = tuple(input_pipeline.rescaled_shape(tf.constant([height, width]), side).numpy())
      assert got == expected, (height, width, side)
      short, long = sorted((height, width))
      assert min(expected) == side and abs(max(expected) - long * side / short) <= 0.5


@pytest.mark.parametrize('name,smallest_side', [('coffee', 256), ('coffee_portrait', 224),
                                                ('chelsea', 384), ('astronaut', 256),
                                                ('china', 512)])
def test_rescale_matches_pils_antialiased_bilinear_resize(photos, name, smallest_side):
  photo = photos[name]
  out = input_pipeline.rescale(tf.constant(photo), smallest_side).numpy()
  h, w = out.shape[:2]
  reference = np.asarray(Image.fromarray(photo).resize((w, h), Image.Resampling.BILINEAR),
                         np.float64)
  diff = np.abs(out - reference)
  # PIL rounds to uint8 (<= 0.5); the two bilinear / triangle filters agree to a fraction more.
  assert diff.mean() < 0.5, diff.mean()
  assert diff.max() <= 1.5, diff.max()


# ---------------------------------------------------------------------------------------------
# Scale jittering.


def test_sample_scale_is_uniform_over_the_integers_smin_to_smax():
  smin, smax, n = 256, 271, 4_000
  draws = map_seeds(lambda s: input_pipeline.sample_scale(s, smin, smax), fresh_tf_seeds(n))
  assert draws.dtype == np.int32 and draws.shape == (n,)
  assert draws.min() == smin and draws.max() == smax
  counts = np.bincount(draws - smin, minlength=smax - smin + 1)
  assert len(counts) == smax - smin + 1
  low, high = binomial_bounds(n, 1 / len(counts))
  assert np.all((counts > low) & (counts < high)), counts
  assert stats.chisquare(counts).pvalue > 1e-6, counts


def test_sample_scale_with_smin_equal_smax_is_that_s():
  for seed in fresh_tf_seeds(5):
    assert int(input_pipeline.sample_scale(tf.constant(seed), 300, 300)) == 300


def _estimate_smallest_side(crop: np.ndarray, ramp_width: int) -> float:
  """S of a crop of a horizontal ramp (value = x on a ramp_width^2 square) rescaled to S x S.

  Rescaling by S / ramp_width turns the slope 1 into ramp_width / S; a least-squares fit over the
  crop's middle columns (away from any image border) recovers S to a fraction of a pixel.
  """
  row = crop[crop.shape[0] // 2, :, 0].astype(np.float64)
  x = np.arange(20, len(row) - 20)
  slope = np.polyfit(x, row[x], 1)[0]
  return ramp_width / slope


def test_train_transform_draws_s_across_the_whole_jitter_range():
  width, smin, smax, size, n = 256, 256, 512, 224, 300
  ramp = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, :, None], (width, width, 3))
  encoded = png(np.ascontiguousarray(ramp))
  crops = map_seeds(lambda s: input_pipeline.train_transform(
      encoded, s, scale=(smin, smax), image_size=size, flip=False), fresh_tf_seeds(n))
  scales = np.array([_estimate_smallest_side(c, width) for c in crops])
  # The estimate is good to a few tenths of a pixel (the crop is rounded to uint8).
  assert scales.min() > smin - 0.5 and scales.max() < smax + 0.5, (scales.min(), scales.max())
  scales = np.round(scales).astype(int)
  # 300 uniform draws from 257 values: both ends' tenth is hit, and most draws differ.
  assert scales.min() < smin + (smax - smin) // 10 and scales.max() > smax - (smax - smin) // 10
  assert len(set(scales)) > n // 2
  # Fixed S: the same ramp rescaled to exactly S every time.
  fixed = map_seeds(lambda s: input_pipeline.train_transform(
      encoded, s, scale=(300, 300), image_size=size, flip=False), fresh_tf_seeds(10))
  for crop in fixed:
    assert abs(_estimate_smallest_side(crop, width) - 300) < 0.5


# ---------------------------------------------------------------------------------------------
# Crops and flips.


@pytest.mark.parametrize('name', ['coffee', 'coffee_portrait', 'chelsea', 'china'])
def test_train_crop_without_flip_is_a_window_of_the_rescaled_image(photos, name):
  encoded = png(photos[name])
  rescaled = rescaled_uint8(encoded, 256)
  crops = map_seeds(lambda s: input_pipeline.train_transform(
      encoded, s, scale=(256, 256), image_size=IMAGE_SIZE, flip=False), fresh_tf_seeds(8))
  for crop in crops:
    assert window_offsets(rescaled, crop), f'{name}: crop is no window of the rescaled image'


def test_train_flip_mirrors_about_half_the_crops_and_crop_offsets_vary(photos):
  n = 200
  encoded = png(photos['astronaut'])
  rescaled = rescaled_uint8(encoded, 256)  # 256 x 256: 33 x 33 possible offsets.
  crops = map_seeds(lambda s: input_pipeline.train_transform(
      encoded, s, scale=(256, 256), image_size=IMAGE_SIZE, flip=True), fresh_tf_seeds(n))
  flipped, offsets = 0, []
  for crop in crops:
    plain, mirrored = window_offsets(rescaled, crop), window_offsets(rescaled, crop[:, ::-1])
    assert len(plain) + len(mirrored) == 1, (plain, mirrored)
    flipped += bool(mirrored)
    offsets.append((plain or mirrored)[0])
  low, high = binomial_bounds(n, 0.5)
  assert low < flipped < high, flipped
  tops, lefts = np.array(offsets).T
  span = 256 - IMAGE_SIZE
  for axis in (tops, lefts):
    assert axis.min() >= 0 and axis.max() <= span
    assert len(set(axis)) >= 15, sorted(set(axis))
    assert axis.min() <= 3 and axis.max() >= span - 3, (axis.min(), axis.max())


@pytest.mark.parametrize('q', [224, 256, 384])
def test_eval_transform_is_the_central_crop_of_the_rescaled_image(photos, q):
  for name, photo in photos.items():
    encoded = jpeg(photo)
    rescaled = rescaled_uint8(encoded, q)
    h, w = rescaled.shape[:2]
    top, left = (h - IMAGE_SIZE) // 2, (w - IMAGE_SIZE) // 2
    expected = rescaled[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
    out = input_pipeline.eval_transform(encoded, scale=q, image_size=IMAGE_SIZE).numpy()
    np.testing.assert_array_equal(out, expected, err_msg=f'{name} at Q={q}')


# ---------------------------------------------------------------------------------------------
# Device side: colour shift and mean subtraction.


def test_pca_constants_are_alexnets():
  np.testing.assert_allclose(preprocess.PCA_EIGVAL, PAPER_EIGVAL, rtol=0, atol=1e-7)
  np.testing.assert_allclose(preprocess.PCA_EIGVEC, PAPER_EIGVEC, rtol=0, atol=1e-7)
  # The eigenvectors are its columns: orthonormal to the 4 printed digits.
  np.testing.assert_allclose(PAPER_EIGVEC.T @ PAPER_EIGVEC, np.eye(3), atol=1e-4)


@pytest.mark.parametrize('std', [0.1, 0.5])
def test_color_shift_has_zero_mean_and_alexnets_pca_covariance(std):
  n = 20_000
  shifts = np.asarray(preprocess.color_shift(jax.random.key(fresh_seed()), n, std), np.float64)
  assert shifts.shape == (n, 3)
  expected_cov = 255.0**2 * PAPER_EIGVEC @ np.diag(std**2 * PAPER_EIGVAL**2) @ PAPER_EIGVEC.T
  channel_sd = np.sqrt(np.diag(expected_cov))
  assert np.all(np.abs(shifts.mean(0)) < 6 * channel_sd / math.sqrt(n)), shifts.mean(0)
  cov = np.cov(shifts, rowvar=False)
  np.testing.assert_allclose(cov, expected_cov, rtol=0, atol=0.05 * expected_cov.max())
  # In the eigenbasis: independent components of variance (255 std eigval_k)^2, each within 5%
  # (the sampling error of a variance of 20,000 draws is 1%).
  z = shifts @ PAPER_EIGVEC
  expected_var = (255.0 * std * PAPER_EIGVAL)**2
  np.testing.assert_allclose(z.var(0), expected_var, rtol=0.05)
  corr = np.corrcoef(z, rowvar=False)
  assert np.all(np.abs(corr[~np.eye(3, dtype=bool)]) < 0.05), corr


@pytest.fixture(scope='module')
def photo_crops(photos) -> np.ndarray:
  """Eight 64x64 uint8 crops of real photos at random places."""
  rng = np.random.default_rng(fresh_seed())
  names = sorted(photos)
  crops = []
  for i in range(8):
    photo = photos[names[i % len(names)]]
    top = rng.integers(0, photo.shape[0] - 64)
    left = rng.integers(0, photo.shape[1] - 64)
    crops.append(photo[top:top + 64, left:left + 64])
  return np.stack(crops)


def test_train_images_add_one_colour_shift_per_image_to_every_pixel(photo_crops):
  out = np.asarray(preprocess.train_images(jnp.asarray(photo_crops), jax.random.key(fresh_seed()),
                                           NORMALIZATION, 0.1), np.float64)
  assert out.shape == photo_crops.shape
  shift = out - (photo_crops.astype(np.float64) - MEAN_RGB)
  per_image = shift[:, :1, :1, :]
  np.testing.assert_allclose(shift, np.broadcast_to(per_image, shift.shape), atol=1e-3)
  per_image = per_image[:, 0, 0, :]
  # Different images, different shifts; sizes are those of the PCA shift (a few 0-255 units).
  distances = np.linalg.norm(per_image[:, None] - per_image[None], axis=-1)
  assert np.all(distances[~np.eye(len(per_image), dtype=bool)] > 1e-3), distances
  assert np.all(np.linalg.norm(per_image, axis=-1) < 255 * 0.1 * 6 * PAPER_EIGVAL[0])
  # And with std 0, nothing but the mean is subtracted.
  plain = preprocess.train_images(jnp.asarray(photo_crops), jax.random.key(fresh_seed()),
                                  NORMALIZATION, 0.0)
  np.testing.assert_allclose(np.asarray(plain), photo_crops - MEAN_RGB, atol=1e-4)


def test_normalize_subtracts_the_mean_rgb_in_the_requested_dtype(photo_crops):
  out = preprocess.normalize(jnp.asarray(photo_crops), NORMALIZATION)
  assert out.dtype == jnp.float32 and out.shape == photo_crops.shape
  expected = photo_crops.astype(np.float64) - MEAN_RGB
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out, np.float64).mean(axis=(0, 1, 2)),
                             photo_crops.mean(axis=(0, 1, 2)) - MEAN_RGB, atol=1e-3)
  half = preprocess.normalize(jnp.asarray(photo_crops), NORMALIZATION, dtype=jnp.bfloat16)
  assert half.dtype == jnp.bfloat16
  # bfloat16 keeps 8 significant bits: the exact difference rounded to a relative 2^-8.
  np.testing.assert_allclose(np.asarray(half, np.float64), expected,
                             atol=0.01, rtol=2.0**-8)


# ---------------------------------------------------------------------------------------------
# The digits dataset.


def test_digits_builder_has_sklearns_sizes_and_stratified_class_counts(builder, sklearn_split,
                                                                      stored_examples):
  digits, split = sklearn_split
  assert builder.info.splits['train'].num_examples == DIGITS_TRAIN == len(split['train'])
  assert builder.info.splits['test'].num_examples == DIGITS_TEST == len(split['test'])
  assert input_pipeline.num_classes(builder) == 10
  for name in ('train', 'test'):
    images, labels = stored_examples[name]
    np.testing.assert_array_equal(class_counts(labels), class_counts(digits.target[split[name]]),
                                  err_msg=name)
    assert images.shape == (len(split[name]), 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], images[..., 1])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def standardize(rows: np.ndarray) -> np.ndarray:
  rows = rows - rows.mean(axis=1, keepdims=True)
  return rows / rows.std(axis=1, keepdims=True)


def test_digits_images_are_sklearns_digits_upsampled(sklearn_split, stored_examples):
  """Each image, averaged back to 8x8, correlates > 0.9 with a same-class digit of its split."""
  digits, split = sklearn_split
  for name in ('train', 'test'):
    images, labels = stored_examples[name]
    small = images[..., 0].astype(np.float64).reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4))
    candidates = digits.images[split[name]].reshape(-1, 64)
    candidate_labels = digits.target[split[name]]
    matched = []
    for label in range(10):
      mine, pool = np.flatnonzero(labels == label), np.flatnonzero(candidate_labels == label)
      corr = standardize(small.reshape(-1, 64)[mine]) @ standardize(candidates[pool]).T / 64
      best = corr.argmax(axis=1)
      assert corr.max(axis=1).min() > 0.9, (name, label, corr.max(axis=1).min())
      matched.extend(pool[best])
    # The best matches are (nearly) one-to-one: each stored image is its own digit.
    assert len(set(matched)) > 0.97 * len(matched), (name, len(set(matched)))
    # Grey levels: 0-16 scaled to 0-255.
    assert images.max() >= 250


# ---------------------------------------------------------------------------------------------
# Training batches.


def take(ds, n: int) -> list:
  return [batch for _, batch in zip(range(n), input_pipeline.as_numpy(ds))]


def test_train_batches_are_device_shaped_uint8_images_and_int32_labels(digits_config, builder):
  assert jax.local_device_count() == NUM_DEVICES
  config = config_copy(digits_config, batch_size=64)
  sizes = input_pipeline.train_sizes(builder, config)
  assert (sizes.local_batch, sizes.per_device_batch) == (64, 8)
  assert sizes.steps_per_epoch == DIGITS_TRAIN // 64
  for batch in take(input_pipeline.train_dataset(builder, config), 3):
    assert set(batch) == {'image', 'label'}
    assert batch['image'].dtype == np.uint8 and batch['image'].shape == (8, 8, 32, 32, 3)
    assert batch['label'].dtype == np.int32 and batch['label'].shape == (8, 8)
    assert batch['label'].min() >= 0 and batch['label'].max() < 10
    # Grey digits stay grey (no colour shift on the host); digits have ink.
    np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])
    assert batch['image'].max(axis=(2, 3, 4)).min() > 100


@pytest.fixture(scope='module')
def train_stream(digits_config, builder):
  """The first 2 epochs + 5 batches from step 0 (the reference for resumption)."""
  config = config_copy(digits_config, batch_size=64, seed=fresh_seed() % 1000)
  steps = DIGITS_TRAIN // 64
  return config, take(input_pipeline.train_dataset(builder, config), 2 * steps + 5)


@pytest.mark.parametrize('offset', [3, 20, 25, 44], ids=lambda k: f'start{k}')
def test_train_stream_resumed_at_step_k_equals_the_stream_from_0_after_k_batches(
    builder, train_stream, offset):
  config, reference = train_stream
  steps = DIGITS_TRAIN // 64  # 22: starts 20 and 25, 44 cross or start at an epoch boundary.
  assert input_pipeline.train_sizes(builder, config).steps_per_epoch == steps
  resumed = take(input_pipeline.train_dataset(builder, config, start_step=offset), 5)
  for i, batch in enumerate(resumed):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(batch[key], reference[offset + i][key],
                                    err_msg=f'batch {offset + i}, {key}')


@pytest.mark.parametrize('processes,devices', [(1, 4), (2, 4), (4, 2)])
def test_a_run_resumed_on_other_hosts_and_devices_reads_the_global_batches_of_the_original(
    builder, train_stream, monkeypatch, processes, devices):
  """The reference: one process of 8 devices from step 0. Resumed at step 20 (the epoch ends at
  22) on `processes` x `devices`, the processes' batches side by side are its global batches."""
  config, reference = train_stream
  monkeypatch.setattr(jax, 'process_count', lambda: processes)
  monkeypatch.setattr(jax, 'local_device_count', lambda: devices)
  streams = []
  for process in range(processes):
    monkeypatch.setattr(jax, 'process_index', lambda p=process: p)
    streams.append(take(input_pipeline.train_dataset(builder, config, start_step=20), 4))
  for i in range(4):
    assert streams[0][i]['image'].shape[:2] == (devices, 64 // processes // devices)
    for key in ('image', 'label'):
      resumed = np.concatenate([s[i][key].reshape((-1,) + s[i][key].shape[2:]) for s in streams])
      np.testing.assert_array_equal(resumed, reference[20 + i][key].reshape(resumed.shape),
                                    err_msg=f'step {20 + i}, {key}')


def test_each_epoch_starts_with_examples_drawn_from_the_whole_split(digits_config, builder,
                                                                   stored_examples):
  """A uniform permutation per epoch: where the first 4 batches of epochs 0 and 1 are stored is
  uniform over the split (Kolmogorov-Smirnov), not its first part, as a shuffle buffer smaller
  than the split or files read in order would give."""
  config = config_copy(digits_config, batch_size=64, train_scale=(32, 32), seed=fresh_seed() % 1000)
  steps = DIGITS_TRAIN // 64
  where = {(img.tobytes(), int(label)): i
           for i, (img, label) in enumerate(zip(*stored_examples['train']))}
  batches = take(input_pipeline.train_dataset(builder, config), steps + 4)
  for epoch in (0, 1):
    positions = [where[img.tobytes(), int(label)] for batch in batches[epoch * steps:][:4]
                 for img, label in zip(batch['image'].reshape(-1, 32, 32, 3),
                                       batch['label'].ravel())]
    assert stats.kstest(np.array(positions) / DIGITS_TRAIN, 'uniform').pvalue > 1e-4, epoch


def test_train_epochs_are_shuffled_differently(train_stream):
  _, reference = train_stream
  steps = DIGITS_TRAIN // 64
  epoch0 = np.concatenate([b['label'].ravel() for b in reference[:steps]])
  epoch1 = np.concatenate([b['label'].ravel() for b in reference[steps:2 * steps]])
  assert not np.array_equal(epoch0, epoch1)
  assert not np.array_equal(reference[0]['image'], reference[steps]['image'])


def test_train_seed_changes_the_stream(builder, train_stream):
  config, reference = train_stream
  other = config_copy(config, seed=config.seed + 1)
  batch = take(input_pipeline.train_dataset(builder, other), 1)[0]
  assert not np.array_equal(batch['image'], reference[0]['image'])


# The global training batches of seed 0 at the given steps: the first 16 hex digits of sha256
# over the images' bytes then the labels', as vgg_jax computed them at 51df392, reading each
# split from ArrayRecord copies that training wrote beside its shards. The published runs
# (README, docs/reproduction.md) trained on these batches.
PUBLISHED_BATCHES = {
    'sklearn_digits': {0: '8baa1bbac0ed1a89', 1: '3ab9a18e48d9bc77', 2: '0c61d196a4f630ae',
                       21: '72ec8e6563d9c578', 22: '640451d1651b09c9', 23: 'ff23ea082f9d7659'},
    'scaled_digits': {0: '787d9bef9a3c3b84', 1: '3ee9de6b3d031f5e', 88: 'a8f29fcbca7fd90a',
                      89: '4ab0dbc1c032573e'},
}


def batch_digest(batch) -> str:
  digest = hashlib.sha256(np.ascontiguousarray(batch['image']).tobytes())
  digest.update(np.ascontiguousarray(batch['label']).tobytes())
  return digest.hexdigest()[:16]


@pytest.mark.parametrize('dataset,where', [
    ('sklearn_digits', 'twins'), ('sklearn_digits', 'copy'),
    pytest.param('scaled_digits', 'twins', marks=pytest.mark.slow)])  # Prepared: 10-30 s.
def test_global_batches_of_seed_0_are_the_published_ones(digits_config, tmp_path, dataset,
                                                         where):
  """Bitwise, whether the split is read from twins written at preparation or from a copy
  (a dataset prepared as TFRecord alone): the stream crosses the first epoch's end."""
  if dataset == 'sklearn_digits':
    config = config_copy(digits_config, seed=0)
  else:  # The miniature's dataset and training scales (docs/reproduction.md).
    config = mini.get_config('D,S=36-72')
    config.update(data_dir=str(tmp_path / 'tfds'), seed=0)
  builder = input_pipeline.get_builder(config)
  if where == 'copy':  # The dataset as tfds alone prepares it: no twins.
    shutil.copytree(builder.data_dir_root, tmp_path / 'plain')
    for name in os.listdir(tmp_path / 'plain' / dataset / '1.0.0'):
      if '.array_record-' in name:
        os.remove(tmp_path / 'plain' / dataset / '1.0.0' / name)
    config.update(data_dir=str(tmp_path / 'plain'), random_access_dir=str(tmp_path / 'copies'))
    builder = input_pipeline.get_builder(config)
  digests = {step: batch_digest(take(input_pipeline.train_dataset(builder, config, step), 1)[0])
             for step in PUBLISHED_BATCHES[dataset]}
  assert digests == PUBLISHED_BATCHES[dataset]
  read_from = random_access.location(builder, config.train_split, config.random_access_dir)
  assert read_from == (builder.data_dir if where == 'twins'
                       else random_access.copy_dir(builder, config.random_access_dir))


def test_each_train_epoch_draws_each_example_at_most_once(digits_config, builder, stored_examples):
  # S = 32 = the digits' size and a 32 crop: the transform is the identity, so the examples
  # can be recognised.
  config = config_copy(digits_config, batch_size=64, train_scale=(32, 32), seed=fresh_seed() % 1000)
  steps = DIGITS_TRAIN // 64
  train = example_multiset(*stored_examples['train'])
  batches = take(input_pipeline.train_dataset(builder, config), 2 * steps)
  for epoch in range(2):
    seen = example_multiset(
        np.concatenate([b['image'].reshape(-1, 32, 32, 3) for b in batches[epoch * steps:][:steps]]),
        np.concatenate([b['label'].ravel() for b in batches[epoch * steps:][:steps]]))
    assert sum(seen.values()) == steps * 64
    assert not seen - train, f'epoch {epoch}: examples not in the train split, or repeated'


def test_train_dataset_flips_each_example_by_its_own_draw(digits_config, builder,
                                                          stored_examples):
  # S = 32 and a 32 crop leave only the flip: each image is a stored example or its mirror.
  config = config_copy(digits_config, batch_size=64, train_scale=(32, 32), random_flip=True,
                       seed=fresh_seed() % 1000)
  steps = DIGITS_TRAIN // 64
  train = {img.tobytes() for img in stored_examples['train'][0]}
  batches = take(input_pipeline.train_dataset(builder, config), steps)
  images = np.concatenate([b['image'].reshape(-1, 32, 32, 3) for b in batches])
  plain = np.array([img.tobytes() in train for img in images])
  mirrored = np.array([np.ascontiguousarray(img[:, ::-1]).tobytes() in train for img in images])
  assert np.all(plain | mirrored)
  flipped = np.sum(mirrored & ~plain)  # Symmetric digits count as not flipped.
  low, high = binomial_bounds(len(images), 0.5)
  assert low < flipped < high, (flipped, len(images))


# ---------------------------------------------------------------------------------------------
# Evaluation batches.


def test_eval_dataset_counts_every_test_example_exactly_once(digits_config, builder,
                                                             sklearn_split, stored_examples):
  digits, split = sklearn_split
  config = config_copy(digits_config, eval_batch_size=64, eval_scale=32)
  ds, num_batches = input_pipeline.eval_dataset(builder, config)
  assert num_batches == math.ceil(DIGITS_TEST / 64) == 6
  batches = list(input_pipeline.as_numpy(ds))
  assert len(batches) == num_batches
  for batch in batches:
    assert set(batch) == {'image', 'label', 'mask'}
    assert batch['image'].shape == (8, 8, 32, 32, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (8, 8) and batch['label'].dtype == np.int32
    assert batch['mask'].shape == (8, 8)
  mask = np.concatenate([b['mask'].ravel() for b in batches]).astype(bool)
  labels = np.concatenate([b['label'].ravel() for b in batches])
  images = np.concatenate([b['image'].reshape(-1, 32, 32, 3) for b in batches])
  assert mask.sum() == DIGITS_TEST
  np.testing.assert_array_equal(class_counts(labels[mask]),
                                class_counts(digits.target[split['test']]))
  # Q = 32: the eval transform is the identity, and the real examples are the test split's.
  assert example_multiset(images[mask], labels[mask]) == example_multiset(*stored_examples['test'])
  assert not images[~mask].any()


def test_eval_dataset_at_the_default_q_keeps_the_label_histogram(digits_config, builder,
                                                                 sklearn_split):
  digits, split = sklearn_split
  config = config_copy(digits_config, eval_batch_size=64)  # Q = (32 + 36) // 2.
  ds, num_batches = input_pipeline.eval_dataset(builder, config)
  batches = list(input_pipeline.as_numpy(ds))
  assert len(batches) == num_batches
  mask = np.concatenate([b['mask'].ravel() for b in batches]).astype(bool)
  labels = np.concatenate([b['label'].ravel() for b in batches])
  assert mask.sum() == DIGITS_TEST
  np.testing.assert_array_equal(class_counts(labels[mask]),
                                class_counts(digits.target[split['test']]))


# ---------------------------------------------------------------------------------------------
# imagenet2012 without its archives.


def test_imagenet_without_archives_raises_naming_the_files_and_the_directory(
    digits_config, tmp_path, monkeypatch):
  def no_download(*args, **kwargs):
    raise AssertionError('download_and_prepare must not run without the archives')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_download)
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  config = config_copy(digits_config, dataset='imagenet2012',
                       data_dir=str(tmp_path / 'tfds'), manual_dir=str(manual_dir))
  with pytest.raises(errors.ConfigError) as error:
    input_pipeline.get_builder(config)
  message = str(error.value)
  for expected in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar', str(manual_dir)):
    assert expected in message, message
  assert not any(manual_dir.iterdir())

  # With the training archive in place, only the validation archive is named.
  (manual_dir / 'ILSVRC2012_img_train.tar').write_bytes(b'')
  with pytest.raises(errors.ConfigError) as error:
    input_pipeline.get_builder(config)
  assert 'ILSVRC2012_img_val.tar' in str(error.value)
  assert 'ILSVRC2012_img_train.tar' not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Prefetching to the devices.


@pytest.mark.parametrize('size', [1, 2, 10])
def test_prefetch_to_device_yields_every_batch_in_order_split_over_the_devices(size):
  rng = np.random.default_rng(fresh_seed())
  batches = [{'image': rng.integers(0, 256, (NUM_DEVICES, 4, 6, 6, 3), dtype=np.uint8),
              'label': rng.integers(0, 10, (NUM_DEVICES, 4), dtype=np.int32)} for _ in range(5)]
  pulled = []

  def source():
    for i, batch in enumerate(batches):
      pulled.append(i)
      yield batch

  out = []
  for batch in steps.prefetch_to_device(source(), size=size):
    if not out:  # Read ahead by `size` batches, no more, when the first is handed out.
      assert len(pulled) == min(size + 1, len(batches))
    out.append(batch)
  assert len(out) == len(batches)
  for got, expected in zip(out, batches):
    assert set(got) == set(expected)
    for key, value in expected.items():
      array = got[key]
      assert isinstance(array, jax.Array)
      assert array.shape == value.shape and array.dtype == value.dtype
      shards = array.addressable_shards
      assert len(shards) == NUM_DEVICES
      assert {shard.device for shard in shards} == set(jax.local_devices())
      assert len(array.sharding.device_set) == NUM_DEVICES
      for shard in shards:
        assert shard.data.shape == (1,) + value.shape[1:]
        np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
      np.testing.assert_array_equal(np.asarray(array), value)


def test_prefetch_to_device_of_nothing_yields_nothing():
  assert not list(steps.prefetch_to_device(iter([]), size=2))


# ---------------------------------------------------------------------------------------------
# Decoding only the crop's window of a JPEG (config.decode_crop).


@pytest.mark.parametrize('shape,smallest_side', [((375, 500), 256), ((500, 375), 384),
                                                 ((300, 451), 512), ((224, 224), 224)])
def test_jpeg_crop_window_is_the_rescaled_crop_mapped_back_to_the_original(shape, smallest_side):
  seeds = fresh_tf_seeds(200)
  height, width = shape
  ratio = smallest_side / min(shape)
  scaled = np.maximum(np.round(np.array(shape) * ratio).astype(int), smallest_side)
  offsets = []
  for seed in seeds:
    offset, top_left, size = (t.numpy() for t in input_pipeline.jpeg_crop_window(
        tf.constant(shape), smallest_side, IMAGE_SIZE, tf.constant(seed)))
    assert np.all(offset >= 0) and np.all(offset <= scaled - IMAGE_SIZE), offset
    per_axis = scaled / np.array(shape)
    # Rounded to the nearest pixel (float32 arithmetic may round an exact half either way).
    assert np.all(np.abs(top_left - offset / per_axis) <= 0.5 + 1e-4), (top_left, offset)
    assert np.all(np.abs(size - IMAGE_SIZE / per_axis) <= 1), size
    assert np.all(top_left >= 0) and np.all(top_left + size <= [height, width])
    offsets.append(offset)
  offsets = np.array(offsets)
  for axis in range(2):
    span = scaled[axis] - IMAGE_SIZE
    if span:  # Uniform over 0..span: both ends come close.
      assert offsets[:, axis].min() <= max(1, span // 8), offsets[:, axis].min()
      assert offsets[:, axis].max() >= span - max(1, span // 8), offsets[:, axis].max()


@pytest.mark.parametrize('name', ['coffee', 'coffee_portrait', 'chelsea', 'astronaut'])
@pytest.mark.parametrize('smallest_side', [256, 384])
def test_decode_crop_gives_the_pixels_of_rescaling_the_whole_jpeg_then_cropping(
    photos, name, smallest_side):
  encoded = jpeg(photos[name])
  rescaled = input_pipeline.rescale(input_pipeline.decode(encoded), smallest_side).numpy()
  differences = []
  for seed in fresh_tf_seeds(8):
    fast = input_pipeline.decode_crop_jpeg(encoded, smallest_side, IMAGE_SIZE,
                                           tf.constant(seed)).numpy()
    offset, _, _ = input_pipeline.jpeg_crop_window(
        tf.shape(input_pipeline.decode(encoded))[:2], smallest_side, IMAGE_SIZE,
        tf.constant(seed))
    top, left = offset.numpy()
    reference = rescaled[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
    differences.append(np.abs(fast - reference).mean())
    # The window's edges round to whole pixels of the original (up to half a source pixel's
    # shift) and mild shrinking skips antialiasing: the same picture, a few grey levels off,
    # more where the rounding is worst on a textured photo (up to ~7 measured over 60 crops).
    assert differences[-1] < 10.0, (name, differences[-1])
    assert np.corrcoef(fast.ravel(), reference.ravel())[0, 1] > 0.97
  assert np.mean(differences) < 4.0, (name, differences)


def test_decode_crop_leaves_non_jpeg_images_on_the_whole_image_path(photos):
  encoded = png(photos['coffee'])
  for seed in fresh_tf_seeds(3):
    kwargs = dict(scale=(256, 512), image_size=IMAGE_SIZE, flip=True)
    np.testing.assert_array_equal(
        input_pipeline.train_transform(encoded, tf.constant(seed), decode_crop=True, **kwargs),
        input_pipeline.train_transform(encoded, tf.constant(seed), decode_crop=False, **kwargs))


def test_normalization_divides_by_std_and_reorders_channels_as_imported_weights_expect(
    photo_crops):
  """torchvision's ((x / 255) - mean) / std on [0, 1] pixels, and Caffe's BGR minus BGR mean."""
  mean01, std01 = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  torch_like = preprocess.Normalization(tuple(255 * mean01), tuple(255 * std01))
  expected = (photo_crops / 255.0 - mean01) / std01
  np.testing.assert_allclose(np.asarray(torch_like(jnp.asarray(photo_crops))), expected,
                             atol=1e-5)
  caffe_like = preprocess.Normalization(tuple(MEAN_RGB), channel_order='BGR')
  bgr = photo_crops[..., ::-1].astype(np.float64) - MEAN_RGB[::-1]
  np.testing.assert_allclose(np.asarray(caffe_like(jnp.asarray(photo_crops))), bgr, atol=1e-4)



def test_input_streams_run_no_autotuning_thread(digits_config, builder):
  """A run ends when its loop does. tf.data's autotuner runs in a thread that sleeps between
  optimisations, for periods doubling up to a minute, and an iterator's teardown joins it; in
  TensorFlow 2.21 the thread can miss the teardown's cancellation (it rechecks before the
  cancellation is marked done) and sleep its period out: runs lingered 5-57 s after their last
  line. Without autotuning there is no such thread."""
  streams = {'train': input_pipeline.train_dataset(builder, digits_config),
             'eval': input_pipeline.eval_dataset(builder, digits_config)[0],
             'test': input_pipeline.test_batches(builder, digits_config, protocol.DENSE, 32)}
  for name, ds in streams.items():
    assert not ds.options().autotune.enabled, name
