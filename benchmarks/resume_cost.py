"""What a resume costs the input: time to the first training batch at step 0 and at 90% of an
epoch, and the steady rate after it, on an ImageNet-sized split.

The split: --records JPEG records (200,000 by default) of 500 x 375 / 375 x 500 photos at about
110 KB each, ILSVRC-2012's mean (about 140 GB over 1.28 M images), cut from the photos bundled
by scikit-image and scikit-learn; written once as a tfds dataset under --root (git-ignored
workdirs/ by default, never committed). Side by side, in turns, on the same files:
  * random access, vgg_jax's reader (`input_pipeline.train_dataset`): epoch e is a permutation
    of the split by (seed, e), read by index from ArrayRecord twins of the shards, so a
    resumed run starts reading at its step;
  * sequential, the reader it replaced (vgg_jax up to commit 0c2412e, re-created below): the
    shards in stored order through a 16,384-example shuffle buffer, then `skip` to the resume
    position, every record before it read again.
The page cache holds what the machine's memory allows; the first pass after writing is warm.

  python -m benchmarks.resume_cost [--records=200000] [--root=workdirs/resume_bench]
  python -m benchmarks.resume_cost --smoke
"""

import io
import json
import os
import platform
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

FLAGS = flags.FLAGS
flags.DEFINE_integer('records', 200_000, 'Examples in the synthetic training split.')
flags.DEFINE_string('root', 'workdirs/resume_bench', 'Where the tfds dataset is written, once.')
flags.DEFINE_integer('batch_size', 256, 'Global batch (one process).')
flags.DEFINE_float('resume_at', 0.9, 'Resume position, as a fraction of an epoch.')
flags.DEFINE_integer('batches', 10, 'Batches timed after the first, for the steady rate.')
flags.DEFINE_integer('repeats', 2, 'Turns of each measurement (the spread is reported).')
flags.DEFINE_string('json', None, 'Also write the results as JSON to this path.')
flags.DEFINE_bool('smoke', False, 'CI settings: 512 records, batch 32, 2 batches, 1 turn.')

SHUFFLE_BUFFER = 16_384  # The replaced reader's default, config.shuffle_buffer_size.


def imagenet_sized_jpegs(count: int = 48) -> list[bytes]:
  """`count` distinct crops of the bundled photos at 500 x 375 or 375 x 500, quality 98, 4:4:4 (about ImageNet's mean size)."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
            skimage.data.rocket(), *datasets.load_sample_images().images]
  rng = np.random.default_rng(0)
  out = []
  for i in range(count):
    photo = Image.fromarray(np.asarray(photos[i % len(photos)])[..., :3])
    w, h = photo.size
    box_w, box_h = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    left, top = rng.integers(0, w - box_w + 1), rng.integers(0, h - box_h + 1)
    size = (500, 375) if i % 2 == 0 else (375, 500)
    image = photo.crop((left, top, left + box_w, top + box_h)).resize(size, Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=98, subsampling=0)
    out.append(buffer.getvalue())
  return out


def register_dataset(records: int):
  """A tfds builder of `records` ImageNet-sized JPEGs, 1,000 classes."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class ResumeBench(tfds.core.GeneratorBasedBuilder):
    """Synthetic ImageNet-sized JPEG records for benchmarks/resume_cost.py."""
    __module__ = 'benchmarks.resume_cost'  # tfds looks for a package; run as __main__ too.
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(num_classes=1000)}), supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      jpegs = imagenet_sized_jpegs()
      for i in range(records):
        yield i, {'image': jpegs[i % len(jpegs)], 'label': i % 1000}

  return ResumeBench


def sequential_train_dataset(builder, config, start_step: int):
  """The replaced reader (commit 0c2412e), one process: stored order, a shuffle buffer, then
  `skip` over the records before the resume position."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vgg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from vgg_jax import protocol  # pylint: disable=g-import-not-at-top
  sizes = input_pipeline.train_sizes(builder, config)
  examples = builder.as_dataset(split=config.train_split, shuffle_files=False,
                                read_config=tfds.ReadConfig(interleave_cycle_length=16),
                                decoders={'image': tfds.decode.SkipDecoding()})
  epoch_size = sizes.steps_per_epoch * sizes.local_batch
  start_epoch, start_batch = divmod(start_step, sizes.steps_per_epoch)
  transform = dict(scale=protocol.scale_bounds(config.train_scale), image_size=config.image_size,
                   flip=config.random_flip, decode_crop=config.decode_crop)

  def one_epoch(epoch):
    seed = tf.cast(config.seed * 1_000_003, tf.int64) * 100_003 + epoch
    ds = examples.shuffle(SHUFFLE_BUFFER, seed=seed).take(epoch_size).enumerate()
    skip = tf.constant(start_batch * sizes.local_batch, tf.int64)
    ds = ds.skip(tf.where(epoch == start_epoch, skip, tf.constant(0, tf.int64)))
    ds = ds.map(lambda i, e: {'image': input_pipeline.train_transform(
        e['image'], tf.stack([seed, i]), **transform), 'label': e['label']},
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(sizes.local_batch, drop_remainder=True)

  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(one_epoch)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(input_pipeline._options())  # pylint: disable=protected-access


def time_reader(make, start_step: int, batches: int) -> dict:
  """Seconds from building the stream to its first batch, and img/s over the next `batches`."""
  from vgg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  stream = input_pipeline.as_numpy(make(start_step))
  first = next(stream)
  to_first = time.perf_counter() - start
  size = first['label'].size
  start = time.perf_counter()
  for _ in range(batches):
    next(stream)
  rate = batches * size / (time.perf_counter() - start) if batches else float('nan')
  return {'first_batch_s': to_first, 'img_per_s': rate}


def main(argv):
  del argv
  if FLAGS.smoke:
    FLAGS.records, FLAGS.batch_size, FLAGS.batches, FLAGS.repeats = 512, 32, 2, 1
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vgg_jax import cli  # pylint: disable=g-import-not-at-top
  from vgg_jax import default_config  # pylint: disable=g-import-not-at-top
  from vgg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  cli.setup()
  register_dataset(FLAGS.records)
  config = default_config.get_config()
  config.dataset = 'resume_bench'
  config.data_dir = os.path.join(FLAGS.root, f'{FLAGS.records}_records')
  config.batch_size = FLAGS.batch_size - FLAGS.batch_size % jax.local_device_count()
  start = time.perf_counter()
  builder = input_pipeline.get_builder(config)
  prepared_s = time.perf_counter() - start
  start = time.perf_counter()
  input_pipeline.train_records(builder, config)
  array_record_s = time.perf_counter() - start
  sizes = input_pipeline.train_sizes(builder, config)
  resume_step = int(FLAGS.resume_at * sizes.steps_per_epoch)
  split_bytes = builder.info.splits['train'].num_bytes
  readers = {
      'random access (vgg_jax)': lambda step: input_pipeline.train_dataset(builder, config, step),
      'sequential + skip (before)': lambda step: sequential_train_dataset(builder, config, step),
  }
  runs = {(name, step): [] for name in readers for step in (0, resume_step)}
  for _ in range(FLAGS.repeats):
    for name, make in readers.items():
      for step in (0, resume_step):
        runs[name, step].append(time_reader(make, step, FLAGS.batches))
  print(f'{FLAGS.records:,} records, {split_bytes / FLAGS.records / 1e3:.0f} KB each '
        f'({split_bytes / 1e9:.1f} GB); batch {config.batch_size}, {sizes.steps_per_epoch} steps '
        f'per epoch, resume at step {resume_step}; {os.cpu_count()} cores, {platform.machine()}; '
        f'jax {jax.__version__}, tensorflow {tf.__version__}. Written once: tfds, with ArrayRecord '
        f'twins of the train shards, {prepared_s:.0f} s (0 if already there); finding the twins '
        f'whole {array_record_s:.1f} s.')
  print()
  print('| reader | first batch, step 0 (s) | first batch, resumed (s) | resumed / step 0 | '
        'img/s after the first batch |')
  print('|---|---|---|---|---|')
  results = {}
  for name in readers:
    zero = [r['first_batch_s'] for r in runs[name, 0]]
    resumed = [r['first_batch_s'] for r in runs[name, resume_step]]
    rate = [r['img_per_s'] for r in runs[name, 0] + runs[name, resume_step]]
    spread = lambda xs, f: '–'.join(f.format(x) for x in sorted({min(xs), max(xs)}))
    print(f'| {name} | {spread(zero, "{:.2f}")} | {spread(resumed, "{:.2f}")} | '
          f'{np.median(resumed) / np.median(zero):.2f}x | {spread(rate, "{:.0f}")} |')
    results[name] = {'first_batch_step0_s': zero, 'first_batch_resumed_s': resumed,
                     'img_per_s': rate}
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'records': FLAGS.records, 'bytes': split_bytes, 'resume_step': resume_step,
                 'batch_size': config.batch_size, 'results': results}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
