"""The training input transform alone, in images per second per CPU core, against PIL.

Real JPEGs: the photos bundled by scikit-image and scikit-learn, resized to ImageNet-like
500 x 375 (landscape) or 375 x 500 (portrait) and encoded at quality 90. The transform is
Sec. 3.1's: decode, isotropic rescale to S (fixed 256, or drawn from [256, 512]), a random
224 crop, a random flip, uint8 out. Measured side by side in one run, on one core each:
  * vgg_jax's tf.data transform decoding and rescaling the whole image (`decode_crop=False`);
  * the same with `decode_crop=True`: only the crop's window is decoded and resized;
  * PIL + torchvision transforms (Resize(S), RandomCrop(224), RandomHorizontalFlip), the
    usual PyTorch pipeline; plain PIL calls doing the same where torchvision is absent.
One core: tf.data runs with one thread (private thread pool of 1, one intra-op thread), PIL
in one Python thread. A host feeding R img/s needs R / (img/s per core) cores. The last row
runs vgg_jax's transform on all cores (parallel map) for reference.

  python -m benchmarks.input_pipeline [--images=400] [--json=PATH]
  python -m benchmarks.input_pipeline --smoke
"""

import io
import json
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

FLAGS = flags.FLAGS
flags.DEFINE_integer('images', 400, 'Images per timed pass (the photos, cycled).')
flags.DEFINE_integer('image_size', 224, 'Crop size.')
flags.DEFINE_string('json', None, 'Also write the results as JSON to this path.')
flags.DEFINE_bool('smoke', False, 'CI settings: 16 images per pass.')

SCALES = {'S=256': (256, 256), 'S=256-512': (256, 512)}


def photos() -> list[np.ndarray]:
  """Bundled RGB photographs: scikit-image's and scikit-learn's."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  images = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
            skimage.data.rocket(), skimage.data.immunohistochemistry()]
  images += list(datasets.load_sample_images().images)
  return [np.asarray(image)[..., :3] for image in images]


def imagenet_like_jpegs() -> list[bytes]:
  """Each photo at 500 x 375 and, transposed, 375 x 500, as quality-90 JPEG bytes."""
  out = []
  for photo in photos():
    for portrait in (False, True):
      image = Image.fromarray(np.transpose(photo, (1, 0, 2)) if portrait else photo)
      image = image.resize((375, 500) if portrait else (500, 375), Image.BILINEAR)
      buffer = io.BytesIO()
      image.save(buffer, format='JPEG', quality=90)
      out.append(buffer.getvalue())
  return out


def tf_rate(encoded: list[bytes], scale, image_size: int, decode_crop: bool, count: int,
            parallel: bool) -> float:
  """Images per second of vgg_jax's train_transform over `count` images."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vgg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  ds = tf.data.Dataset.from_tensor_slices(encoded).repeat().take(count).enumerate()
  ds = ds.map(lambda i, e: input_pipeline.train_transform(
      e, tf.stack([tf.constant(7, tf.int64), i]), scale=scale, image_size=image_size,
      flip=True, decode_crop=decode_crop),
              num_parallel_calls=tf.data.AUTOTUNE if parallel else None)
  options = tf.data.Options()
  if not parallel:
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  for _ in ds.take(8):  # Warm-up: tracing, first allocations.
    pass
  start = time.perf_counter()
  for _ in ds:
    pass
  return count / (time.perf_counter() - start)


def pil_rate(encoded: list[bytes], scale, image_size: int, count: int) -> tuple[float, str]:
  """Images per second of PIL decoding plus torchvision's transforms (or plain PIL)."""
  rng = np.random.default_rng(0)
  try:
    from torchvision import transforms  # pylint: disable=g-import-not-at-top
  except ImportError:
    transforms = None

  def one(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert('RGB')
    smallest_side = int(rng.integers(scale[0], scale[1] + 1))
    if transforms is not None:
      image = transforms.Resize(smallest_side)(image)
      image = transforms.RandomCrop(image_size)(image)
      image = transforms.RandomHorizontalFlip()(image)
      return np.asarray(image)
    width, height = image.size
    ratio = smallest_side / min(width, height)
    image = image.resize((max(smallest_side, round(width * ratio)),
                          max(smallest_side, round(height * ratio))), Image.BILINEAR)
    top = int(rng.integers(0, image.size[1] - image_size + 1))
    left = int(rng.integers(0, image.size[0] - image_size + 1))
    image = image.crop((left, top, left + image_size, top + image_size))
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(image)

  for data in encoded[:8]:
    one(data)
  start = time.perf_counter()
  for i in range(count):
    one(encoded[i % len(encoded)])
  rate = count / (time.perf_counter() - start)
  return rate, ('PIL + torchvision.transforms' if transforms is not None else 'PIL only')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:  # torch before tensorflow: the other order crashes the process (both bundle protobuf).
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  count = 16 if FLAGS.smoke else FLAGS.images
  encoded = imagenet_like_jpegs()
  rows = []
  for name, scale in SCALES.items():
    whole = tf_rate(encoded, scale, FLAGS.image_size, False, count, parallel=False)
    cropped = tf_rate(encoded, scale, FLAGS.image_size, True, count, parallel=False)
    pil, baseline = pil_rate(encoded, scale, FLAGS.image_size, count)
    rows.append({'scale': name, 'tf_whole_per_core': whole, 'tf_decode_crop_per_core': cropped,
                 'pil_per_core': pil, 'baseline': baseline,
                 'decode_crop_over_pil': cropped / pil, 'whole_over_pil': whole / pil})
  all_cores = tf_rate(encoded, SCALES['S=256-512'], FLAGS.image_size, True, count,
                      parallel=True)

  command = ' '.join(['python -m benchmarks.input_pipeline', *sys.argv[1:]])
  import PIL  # pylint: disable=g-import-not-at-top
  versions = {'tensorflow': tf.__version__, 'pillow': PIL.__version__}
  print(f'command: {command}')
  print(f'versions: {versions}; {os.cpu_count()} CPU cores; {len(encoded)} JPEGs of 500x375 '
        f'and 375x500, {count} images per pass, crop {FLAGS.image_size}')
  header = (f'{"scale":<11}{"tf whole":>10}{"tf decode_crop":>16}{"PIL":>8}'
            f'{"decode_crop/PIL":>17}{"whole/PIL":>11}   (img/s on one core)')
  print(header)
  print('-' * len(header))
  for r in rows:
    print(f'{r["scale"]:<11}{r["tf_whole_per_core"]:>10.1f}{r["tf_decode_crop_per_core"]:>16.1f}'
          f'{r["pil_per_core"]:>8.1f}{r["decode_crop_over_pil"]:>16.2f}x'
          f'{r["whole_over_pil"]:>10.2f}x')
  print(f'baseline: {rows[0]["baseline"]}. vgg_jax decode_crop, S=256-512, all '
        f'{os.cpu_count()} cores: {all_cores:.1f} img/s.')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'command': command, 'versions': versions, 'cpu_count': os.cpu_count(),
                 'images_per_pass': count, 'results': rows,
                 'all_cores_decode_crop_jittered': all_cores}, f, indent=2)
    print(f'wrote {FLAGS.json}')


if __name__ == '__main__':
  app.run(main)
