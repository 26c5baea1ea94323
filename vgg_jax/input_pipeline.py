"""tfds -> tf.data input with the paper's training transform (Sec. 3.1) and test rescale (Sec. 3.2).

The host does the geometry: decode, isotropic rescale so the smallest side is S (fixed, or drawn
per image from [Smin, Smax]), a random crop, a random horizontal flip. Images leave as uint8; the
colour shift and mean subtraction run on the device (`vgg_jax.preprocess`).

The training order and every random draw are stateless functions of (config.seed, epoch,
position in the epoch), so the stream of global batches is a pure function of the training
step, read by random access: resuming at step k starts reading at step k, and the global
batches do not depend on how many processes or devices share them. Each process reads its own
part of each global batch; batches come shaped (local_devices, per_device_batch, ...) for
`jax.pmap`.
"""

import dataclasses
import difflib
import math
import os
from typing import Iterator, Optional

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax import datasets  # pylint: disable=unused-import  # Registers vgg_jax's builders.
from vgg_jax import default_config
from vgg_jax import errors
from vgg_jax import protocol
from vgg_jax.datasets import image_folder
from vgg_jax.datasets import random_access

IMAGENET_ARCHIVES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


# ---------------------------------------------------------------------------------------------
# Datasets.


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The tfds builder for `config.dataset`, prepared on first use.

  imagenet2012 cannot be downloaded: it is built from the ILSVRC-2012 tar files the user
  downloads by hand into `config.manual_dir`, and a clear error says so when they are missing.
  'folder:ROOT' is a folder of images, prepared (once) by `image_folder.prepared_builder`.
  """
  if image_folder.is_image_folder(config.dataset):
    return image_folder.prepared_builder(config)
  try:
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    name = default_config.dataset_name(config.dataset)
    close = difflib.get_close_matches(name, tfds.list_builders(), n=3)
    hint = f' Did you mean {" or ".join(close)}?' if close else ''
    raise errors.ConfigError(
        f'config.dataset={config.dataset!r}: not a tfds dataset.{hint} Any name from '
        'tfds.list_builders() works, plus sklearn_digits, which ships with vgg_jax.') from e
  if not builder.is_prepared():
    download_config = None
    if default_config.dataset_name(config.dataset) == 'imagenet2012':
      check_imagenet_archives(config.manual_dir, builder)
      download_config = tfds.download.DownloadConfig(manual_dir=config.manual_dir)
    random_access.prepare(builder, random_access.split_names(config.train_split),
                          download_config)
  check_tfrecord(builder)
  return builder


def check_tfrecord(builder) -> None:
  """Raises unless the dataset is stored as TFRecord: evaluation streams it with tfds'
  `as_dataset`, which reads no ArrayRecord, so a dataset stored only so would fail there."""
  stored = builder.info.file_format
  if stored not in (None, tfds.core.FileFormat.TFRECORD):
    raise errors.ConfigError(
        f'config.data_dir={builder.data_dir_root!s}: {builder.name} is stored there as '
        f'{stored.value}, which tfds cannot stream for evaluation; prepare it with tfds\' '
        'default format (TFRecord), e.g. into another --config.data_dir.')


def check_imagenet_archives(manual_dir: Optional[str], builder) -> None:
  """Raise, naming the files and where they go, unless the ILSVRC-2012 archives are there."""
  where = manual_dir or os.path.join(builder.data_dir_root, 'downloads', 'manual')
  missing = [name for name in IMAGENET_ARCHIVES if not tf.io.gfile.exists(os.path.join(where, name))]
  if missing:
    raise errors.ConfigError(
        f'config.manual_dir={manual_dir!r}: imagenet2012 is not prepared in '
        f'{builder.data_dir_root} and {", ".join(missing)} {"is" if len(missing) == 1 else "are"} '
        f'missing from {where}. Download the ILSVRC-2012 training and validation tar files from '
        'https://image-net.org (an account is needed), put them in one directory and pass it '
        'as --config.manual_dir=DIR.')


def supervised_keys(builder) -> tuple[str, str]:
  if builder.info.supervised_keys:
    image_key, label_key = builder.info.supervised_keys[:2]
    return image_key, label_key
  return 'image', 'label'


def num_classes(builder) -> int:
  return builder.info.features[supervised_keys(builder)[1]].num_classes


def class_names(builder) -> list[str]:
  """The dataset's class names in label order (tfds numbers them when it has none)."""
  return list(builder.info.features[supervised_keys(builder)[1]].names)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """How a global batch maps onto this process and its devices."""
  local_batch: int
  per_device_batch: int
  steps_per_epoch: int


def train_sizes(builder, config) -> Sizes:
  """An epoch is the whole global batches that fit in the split; each process reads its share
  of each. A ConfigError when not one batch fits in the split."""
  examples = builder.info.splits[config.train_split].num_examples
  if examples < config.batch_size:
    devices = jax.device_count()
    largest = examples // devices * devices
    raise errors.ConfigError(
        f'config.batch_size={config.batch_size}: larger than the {config.train_split!r} split '
        f'of {config.dataset} ({examples} examples), so no batch fits in an epoch; use at most '
        f'{largest}, e.g. --config.batch_size={max(devices, largest // 2 // devices * devices)}.')
  local_batch = config.batch_size // jax.process_count()
  return Sizes(local_batch, local_batch // jax.local_device_count(), examples // config.batch_size)


def train_records(builder, config):
  """The serialized examples of `config.train_split`, indexable: `records[i]`,
  `records.__getitems__(ids)`, in the order tfds stores them.

  Training reads the split in a seeded permutation (`train_dataset`), so a resumed run must
  read example i without reading the ones before it, which TFRecord, read front to back, cannot
  do: the records come from ArrayRecord twins of the shards, written beside them when vgg_jax
  prepared the dataset, else from a copy in `config.random_access_dir`, written by the first
  run that needs it (`random_access`). The dataset's directory is never written here.
  """
  return random_access.source(builder, config.train_split, config.random_access_dir)


# ---------------------------------------------------------------------------------------------
# The image transform (tf, per example).


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """JPEG / PNG / GIF / BMP bytes -> HxWx3 uint8 (grey images are repeated to RGB)."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def rescaled_shape(shape: tf.Tensor, smallest_side) -> tf.Tensor:
  """`protocol.rescaled_shape` in TensorFlow ops: (height, width) -> its isotropic rescale
  whose smallest side is `smallest_side`."""
  shape = tf.cast(shape, tf.float32)
  ratio = tf.cast(smallest_side, tf.float32) / tf.reduce_min(shape)
  return tf.maximum(tf.cast(tf.round(shape * ratio), tf.int32), smallest_side)


def rescale(image: tf.Tensor, smallest_side) -> tf.Tensor:
  """Isotropic rescale so the smallest side is `smallest_side` (float32 result).

  Antialiased when shrinking, so downscaled ImageNet photos are not aliased.
  """
  return tf.image.resize(image, rescaled_shape(tf.shape(image)[:2], smallest_side),
                         method='bilinear', antialias=True)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def sample_scale(seed: tf.Tensor, smin: int, smax: int) -> tf.Tensor:
  """S ~ U{Smin, ..., Smax}, one draw per image (Sec. 3.1, multi-scale training)."""
  if smin == smax:
    return tf.constant(smin, tf.int32)
  return tf.random.stateless_uniform([], seed, minval=smin, maxval=smax + 1, dtype=tf.int32)


def jpeg_crop_window(shape: tf.Tensor, smallest_side, image_size: int,
                     seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """A uniformly drawn image_size^2 crop of the image rescaled to `smallest_side`, located in
  the original image: (offset in the rescaled image, window's top-left and size in the
  original), each (row, column) int32."""
  scaled = rescaled_shape(shape, smallest_side)
  shape = tf.cast(shape, tf.float32)
  span = tf.cast(scaled - image_size + 1, tf.float32)
  offset = tf.cast(tf.floor(tf.random.stateless_uniform([2], seed) * span), tf.int32)
  per_axis = tf.cast(scaled, tf.float32) / shape
  top_left = tf.cast(tf.round(tf.cast(offset, tf.float32) / per_axis), tf.int32)
  size = tf.maximum(tf.cast(tf.round(image_size / per_axis), tf.int32), 1)
  return offset, top_left, tf.minimum(size, tf.cast(shape, tf.int32) - top_left)


def decode_crop_jpeg(encoded: tf.Tensor, smallest_side, image_size: int,
                     seed: tf.Tensor) -> tf.Tensor:
  """`rescale` to S then a random crop, for a JPEG, without decoding or resizing the rest.

  The crop's window in the original image is known before decoding (`jpeg_crop_window`), so
  only it is decoded (`tf.io.decode_and_crop_jpeg`) and resized to image_size^2: the same
  crop as rescaling the whole image and cropping, up to where the window's edges round to
  (a third of an output pixel) and antialiasing where it shrinks by less than 2x, at a
  fraction of the cost for ImageNet-sized photos (benchmarks/input_pipeline.py).
  """
  _, top_left, size = jpeg_crop_window(tf.io.extract_jpeg_shape(encoded)[:2], smallest_side,
                                       image_size, seed)
  window = tf.io.decode_and_crop_jpeg(encoded, tf.concat([top_left, size], 0), channels=3)
  resize = lambda antialias: lambda: tf.image.resize(
      window, [image_size, image_size], method='bilinear', antialias=antialias)
  # Shrinking by less than 2x, bilinear sampling already reads every pixel: antialiasing (2.5x
  # the cost of the resize) changes little there and is kept for stronger shrinking.
  shrink = tf.cast(image_size, tf.float32) / tf.cast(tf.reduce_min(size), tf.float32)
  return tf.cond(shrink < 0.5, resize(True), resize(False))


def train_transform(encoded: tf.Tensor, seed: tf.Tensor, *, scale: tuple[int, int],
                    image_size: int, flip: bool, decode_crop: bool = False) -> tf.Tensor:
  """Sec. 3.1: rescale to S, one random image_size^2 crop, random horizontal flip; uint8.

  With `decode_crop`, JPEGs take `decode_crop_jpeg`; other formats are decoded whole.
  """
  scale_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  smallest_side = sample_scale(scale_seed, *scale)

  def whole_image():
    image = rescale(decode(encoded), smallest_side)
    return tf.image.stateless_random_crop(image, [image_size, image_size, 3], crop_seed)

  if decode_crop:
    image = tf.cond(tf.io.is_jpeg(encoded),
                    lambda: decode_crop_jpeg(encoded, smallest_side, image_size, crop_seed),
                    whole_image)
  else:
    image = whole_image()
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return to_uint8(image)


def eval_transform(encoded: tf.Tensor, *, scale: int, image_size: int) -> tf.Tensor:
  """Sec. 3.2, single crop: rescale to Q, the central image_size^2 crop; uint8."""
  image = rescale(decode(encoded), scale)
  shape = tf.shape(image)
  top, left = (shape[0] - image_size) // 2, (shape[1] - image_size) // 2
  return to_uint8(image[top:top + image_size, left:left + image_size])


def dense_test_image(encoded: tf.Tensor, *, scale: int, size_step: int,
                     max_aspect: float) -> tuple[tf.Tensor, tf.Tensor]:
  """Sec. 3.2 dense evaluation input: the whole image rescaled to Q, as (padded image, size).

  The long side is centre-cropped to max_aspect * Q, and both sides are zero-padded on the
  bottom/right up to a multiple of `size_step`, so images of all aspect ratios fall into a
  few shapes (`protocol.dense_shapes_bound`) and the net compiles once per shape.
  """
  image = to_uint8(rescale(decode(encoded), scale))
  shape = tf.shape(image)[:2]
  kept = tf.minimum(shape, max(scale, int(max_aspect * scale)))
  top, left = (shape[0] - kept[0]) // 2, (shape[1] - kept[1]) // 2
  image = image[top:top + kept[0], left:left + kept[1]]
  padded = -(-kept // size_step) * size_step
  image = tf.pad(image, [[0, padded[0] - kept[0]], [0, padded[1] - kept[1]], [0, 0]])
  return image, kept


def multicrop_test_crops(encoded: tf.Tensor, *, scale: int, image_size: int) -> tf.Tensor:
  """Sec. 3.2 multi-crop input: the image rescaled to Q, then a 5 x 5 regular grid of
  image_size^2 crops from corner to corner, (25, size, size, 3) uint8 (flips are added on
  the device)."""
  image = to_uint8(rescale(decode(encoded), scale))
  shape = tf.shape(image)
  offsets = lambda length: protocol.crop_offsets(
      length, image_size, round_fn=lambda x: tf.cast(tf.round(x), tf.int32))
  return tf.stack([image[top:top + image_size, left:left + image_size]
                   for top in offsets(shape[0]) for left in offsets(shape[1])])


# ---------------------------------------------------------------------------------------------
# Batches.


def _read(builder, split: str, cache: bool) -> tf.data.Dataset:
  """Encoded examples of this process's part of `split`, in the order tfds stored them."""
  read_config = tfds.ReadConfig(interleave_cycle_length=16)
  ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config,
                          decoders={supervised_keys(builder)[0]: tfds.decode.SkipDecoding()})
  return ds.cache() if cache else ds


def _device_shape(batch, local_devices: int):
  return tf.nest.map_structure(
      lambda x: tf.reshape(x, tf.concat([[local_devices, -1], tf.shape(x)[1:]], 0)), batch)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # No autotuning: its thread sleeps between optimisations (periods doubling up to a minute)
  # and an iterator's teardown can wait that sleep out, so a run would linger after its last
  # line. AUTOTUNE maps then run one call per core; prefetch buffers still grow on demand.
  options.autotune.enabled = False
  options.experimental_optimization.map_parallelization = True
  return options


def train_dataset(builder, config, start_step: int = 0) -> tf.data.Dataset:
  """The endless training stream of this process, from global step `start_step` on.

  Epoch e visits the split in the permutation `index_shuffle(., seed=(seed, e))` of all its
  examples, a uniform draw computed per position, with nothing stored or read ahead: global
  batch k of the epoch holds positions [kB, (k+1)B), and process p reads its B/P of them by
  index (`train_records`). Each example's S, crop and flip are drawn from (seed, e, its
  position). So a run resumed at any step reads from there on, and 1 x 8 devices and 2 x 4
  train on the same global batches. The last partial batch of an epoch is not used.
  """
  sizes = train_sizes(builder, config)
  image_key, label_key = supervised_keys(builder)
  features = builder.info.features
  records = train_records(builder, config)
  last_index = tf.constant(len(records) - 1, tf.int64)
  first = jax.process_index() * sizes.local_batch
  transform = dict(scale=protocol.scale_bounds(config.train_scale),
                   image_size=config.image_size, flip=config.random_flip,
                   decode_crop=config.decode_crop)

  def positions(step):
    epoch = step // sizes.steps_per_epoch
    position = (step % sizes.steps_per_epoch) * config.batch_size + first + tf.range(
        sizes.local_batch, dtype=tf.int64)
    order_seed = tf.stack([tf.constant(config.seed, tf.int64), epoch])
    index = tf.random.experimental.index_shuffle(position, order_seed, last_index)
    return epoch, position, index

  def read(epoch, position, index):
    serialized = tf.numpy_function(
        lambda ids: np.array(records.__getitems__(ids.tolist()), dtype=object), [index],
        tf.string, stateful=False)
    serialized.set_shape([sizes.local_batch])
    return tf.fill([sizes.local_batch], epoch), position, serialized

  def prepare(epoch, position, serialized):
    example = features.deserialize_example(
        serialized, decoders={image_key: tfds.decode.SkipDecoding()})
    image_seed = tf.stack([config.seed * 1_000_003 + epoch, position])
    return {'image': train_transform(example[image_key], image_seed, **transform),
            'label': tf.cast(example[label_key], tf.int32)}

  ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max).map(positions)
  ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(sizes.local_batch, drop_remainder=True)
  ds = ds.map(lambda batch: _device_shape(batch, jax.local_device_count()))
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_dataset(builder, config, split: Optional[str] = None) -> tuple[tf.data.Dataset, int]:
  """One pass over `split`, padded so no example is dropped and each is counted once.

  Every process yields the same number of batches (collectives need it): its own slice of the
  split, then padding examples with mask 0 up to that number. Returns (dataset, num_batches).
  """
  split = split or config.eval_split
  local_batch = config.eval_batch_size // jax.process_count()
  total = builder.info.splits[split].num_examples
  num_batches = math.ceil(math.ceil(total / jax.process_count()) / local_batch)
  image_key, label_key = supervised_keys(builder)
  q, size = protocol.single_test_scale(config), config.image_size

  def prepare(example):
    return {'image': eval_transform(example[image_key], scale=q, image_size=size),
            'label': tf.cast(example[label_key], tf.int32), 'mask': tf.constant(True)}

  ds = _read(builder, tfds.split_for_jax_process(split, drop_remainder=False), config.cache)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([size, size, 3], tf.uint8), 'label': tf.constant(0, tf.int32),
      'mask': tf.constant(False)}).repeat()
  ds = ds.concatenate(padding).take(num_batches * local_batch).batch(local_batch)
  ds = ds.map(lambda batch: _device_shape(batch, jax.local_device_count()))
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options()), num_batches


def _pad_batch(batch: dict, size: int) -> dict:
  """Pads a partial last batch to `size` examples; the padding has mask False."""
  missing = size - tf.shape(batch['mask'])[0]
  return {key: tf.pad(value, [[0, missing]] + [[0, 0]] * (len(value.shape) - 1))
          for key, value in batch.items()}


def test_batches(builder, config, method: str, scale: int,
                 split: Optional[str] = None) -> tf.data.Dataset:
  """This process's part of `split` for one pass of the test protocol (`evaluation.run`).

  method 'dense': whole images at Q (`dense_test_image`), grouped so a batch holds one
  shape; 'multicrop': 25 crops per image (`multicrop_test_crops`). Every batch has
  config.{dense,multicrop}_batch_size / processes images, padding masked out, each with its
  'label' and its 'index' in this process's part of the split. Batches are shaped
  (local_devices, per_device, ...).
  """
  split = split or config.eval_split
  image_key, label_key = supervised_keys(builder)
  global_batch = config.dense_batch_size if method == protocol.DENSE else (
      config.multicrop_batch_size)
  local_batch = global_batch // jax.process_count()
  ds = _read(builder, tfds.split_for_jax_process(split, drop_remainder=False), cache=False)

  def prepare(index, example):
    features = {'label': tf.cast(example[label_key], tf.int32), 'index': index,
                'mask': tf.constant(True)}
    if method == protocol.DENSE:
      features['image'], features['size'] = dense_test_image(
          example[image_key], scale=scale, size_step=config.dense_size_step,
          max_aspect=config.dense_max_aspect)
    else:
      features['crops'] = multicrop_test_crops(example[image_key], scale=scale,
                                               image_size=config.image_size)
    return features

  ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  if method == protocol.DENSE:
    shape_key = lambda f: tf.cast(tf.shape(f['image'])[0] * 1_000_003 + tf.shape(f['image'])[1],
                                  tf.int64)
    ds = ds.group_by_window(shape_key, lambda _, group: group.batch(local_batch),
                            window_size=local_batch)
  else:
    ds = ds.batch(local_batch)
  ds = ds.map(lambda batch: _device_shape(_pad_batch(batch, local_batch),
                                          jax.local_device_count()))
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def test_batch_iterator(builder, config, method: str, scale: int,
                        split: Optional[str] = None) -> Iterator[dict]:
  """`test_batches` as numpy, the form `evaluation.run` takes."""
  return as_numpy(test_batches(builder, config, method, scale, split))


def as_numpy(ds: tf.data.Dataset) -> Iterator:
  return iter(tfds.as_numpy(ds))
