"""`config.dataset='folder:ROOT'`: layout, preparation through tfds, and every bad-data case.

The folders are built here from real photos bundled with scikit-image, written with Pillow, plus
broken files made by hand. Expected pixels come from numpy or Pillow computations on the arrays
that were written, never from the code under test.
"""

import io
import json
import logging
import os
import shutil
import struct
import warnings
import zlib

from absl import logging as absl_logging
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments import digits
from vgg_jax import errors
from vgg_jax import input_pipeline
from vgg_jax.datasets import image_folder

PHOTO_SIZE = (48, 40)  # (width, height) of the good photos.
FIXTURE_MAX_PIXELS = 1_000_000
KEPT, CONVERTED, SKIPPED = 'kept', 'converted', 'skipped'


def _photos() -> dict[str, np.ndarray]:
  import skimage.data  # pylint: disable=g-import-not-at-top
  return {'astronaut': skimage.data.astronaut(), 'chelsea': skimage.data.chelsea(),
          'coffee': skimage.data.coffee()}


def _crop(photo: np.ndarray, i: int, size=PHOTO_SIZE) -> np.ndarray:
  """The i-th of several different crops of `photo`, resized to `size` (width, height)."""
  top, left = 17 * i, 23 * i
  window = photo[top:top + 5 * size[1], left:left + 5 * size[0]]
  return np.asarray(Image.fromarray(window).resize(size, Image.Resampling.BILINEAR))


def _save(path, image, fmt: str, **kwargs) -> bytes:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  with open(path, 'wb') as f:
    f.write(buffer.getvalue())
  return buffer.getvalue()


def _write(path, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _png_header_only(width: int, height: int) -> bytes:
  """A valid PNG header claiming width x height RGB, with 100 bytes of pixel data."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(bytes(100)))
          + chunk(b'IEND', b''))


def _blocks(width: int, height: int, block: int, seed: int):
  """An RGB image of flat random-colour blocks (compresses to almost nothing); and the colours."""
  colours = np.random.default_rng(seed).integers(0, 256, (height // block, width // block, 3),
                                                 dtype=np.uint8)
  return Image.fromarray(colours).resize((width, height), Image.Resampling.NEAREST), colours


def _decode(encoded: bytes) -> np.ndarray:
  return input_pipeline.decode(tf.constant(encoded)).numpy()


def _folder_config(root, data_dir, **overrides):
  config = digits.get_config()
  config.dataset = image_folder.PREFIX + str(root)
  config.data_dir = str(data_dir)
  config.eval_split = 'val'
  for key, value in overrides.items():
    config[key] = value
  return config


def _stored(builder, split: str) -> list[tuple[str, int, bytes]]:
  ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  return [(ex['file_name'].decode(), int(ex['label']), ex['image']) for ex in tfds.as_numpy(ds)]


class _Messages(logging.Handler):

  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture
def absl_messages():
  """What absl logs during the test, INFO and up."""
  handler = _Messages()
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level  # NOTSET until flags are parsed; get_verbosity() would say WARNING.
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logger.addHandler(handler)
  yield handler.messages
  absl_logger.removeHandler(handler)
  absl_logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# One folder with every case, prepared once.


class Folder:
  """The fixture folder: its files' expected fates and what was written into them."""

  def __init__(self, root):
    self.root = str(root)
    self.fate = {}  # relpath -> KEPT / CONVERTED / SKIPPED
    self.arrays = {}  # relpath -> the pixels written (where they are known exactly)
    self.raw = {}  # relpath -> the file's bytes

  def add(self, relpath, fate, image=None, fmt=None, data=None, **kwargs):
    path = os.path.join(self.root, relpath)
    if data is None:
      data = _save(path, image, fmt, **kwargs)
    else:
      _write(path, data)
    self.fate[relpath] = fate
    self.raw[relpath] = data
    if isinstance(image, np.ndarray):
      self.arrays[relpath] = image
    return data


def _build_folder(root) -> Folder:
  folder = Folder(root)
  photos = _photos()
  for name, photo in photos.items():
    for i in range(5):
      if name == 'coffee':
        folder.add(f'train/{name}/{i}.png', KEPT, _crop(photo, i), 'PNG')
      else:
        folder.add(f'train/{name}/{i}.jpg', KEPT, _crop(photo, i), 'JPEG', quality=90)
  folder.add('val/chelsea/v0.jpg', KEPT, _crop(photos['chelsea'], 6), 'JPEG')
  folder.add('val/chelsea/v1.jpg', KEPT, _crop(photos['chelsea'], 7), 'JPEG')
  folder.add('val/coffee/v0.png', KEPT, _crop(photos['coffee'], 6), 'PNG')
  folder.add('val/coffee/v1.png', KEPT, _crop(photos['coffee'], 7), 'PNG')
  grey = np.asarray(Image.fromarray(_crop(photos['chelsea'], 3)).convert('L'))
  folder.add('val/chelsea/grey.jpg', KEPT, grey, 'JPEG', quality=95)

  a = 'train/astronaut'
  folder.add(f'{a}/grey.png', KEPT, np.asarray(Image.fromarray(_crop(photos['astronaut'], 2))
                                              .convert('L')), 'PNG')
  folder.add(f'{a}/tiny.jpg', KEPT, _crop(photos['astronaut'], 1, size=(20, 15)), 'JPEG',
             quality=95)
  sixteen = np.random.default_rng(0).integers(0, 65536, (40, 48)).astype(np.uint16)
  sixteen[0, :4] = [0, 65535, 128, 129]
  folder.add(f'{a}/sixteen.png', CONVERTED, sixteen, 'PNG')
  huge, folder.huge_colours = _blocks(12_000, 8_000, 1_000, seed=1)
  folder.add(f'{a}/huge.jpg', CONVERTED, huge, 'JPEG', quality=90)

  c = 'train/chelsea'
  full = _save(os.path.join(root, c, 'x.jpg'), _crop(photos['chelsea'], 4, size=(96, 80)), 'JPEG')
  os.remove(os.path.join(root, c, 'x.jpg'))
  folder.add(f'{c}/truncated.jpg', SKIPPED, data=full[:len(full) // 2])
  folder.add(f'{c}/truncated_tail.jpg', SKIPPED, data=full[:-200])
  folder.add(f'{c}/empty.jpg', SKIPPED, data=b'')
  folder.add(f'{c}/notes.txt', SKIPPED, data=b'Shot on 2024-05-01, all cats.\n')
  folder.add(f'{c}/.DS_Store', SKIPPED, data=b'\x00\x00\x00\x01Bud1' + bytes(500))
  cmyk_rgb = _crop(photos['chelsea'], 5)
  folder.add(f'{c}/cmyk.jpg', CONVERTED, Image.fromarray(cmyk_rgb).convert('CMYK'), 'JPEG',
             quality=95)
  rgba = np.dstack([_crop(photos['chelsea'], 6), np.tile(np.linspace(0, 255, 48).round()
                                                          .astype(np.uint8), (40, 1))])
  folder.add(f'{c}/rgba.png', CONVERTED, rgba, 'PNG')
  la = np.dstack([grey, np.tile(np.linspace(255, 0, 40).round().astype(np.uint8)[:, None],
                                (1, 48))])
  folder.add(f'{c}/la.png', CONVERTED, Image.fromarray(la), 'PNG')
  folder.arrays[f'{c}/la.png'] = la
  palette = Image.fromarray(_crop(photos['chelsea'], 7)).quantize(16)
  folder.add(f'{c}/palette.png', CONVERTED, palette, 'PNG', transparency=0)
  folder.palette = palette
  opaque = np.dstack([_crop(photos['chelsea'], 8), np.full((40, 48), 255, np.uint8)])
  folder.add(f'{c}/opaque_rgba.png', KEPT, opaque, 'PNG')

  f = 'train/coffee'
  folder.add(f'{f}/photo.tiff', CONVERTED, _crop(photos['coffee'], 5), 'TIFF')
  folder.add(f'{f}/photo.webp', CONVERTED, _crop(photos['coffee'], 6), 'WEBP', lossless=True)
  folder.add(f'{f}/photo.gif', KEPT, Image.fromarray(_crop(photos['coffee'], 7)).quantize(64),
             'GIF')
  bits = np.random.default_rng(2).random((40, 48)) > 0.5
  folder.add(f'{f}/bits.bmp', CONVERTED, Image.fromarray(bits), 'BMP')
  folder.arrays[f'{f}/bits.bmp'] = bits
  folder.add(f'{f}/bomb.png', SKIPPED, data=_png_header_only(40_000, 30_000))
  folder.add(f'{f}/bigger_bomb.png', SKIPPED, data=_png_header_only(60_000, 60_000))
  return folder


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """The fixture folder prepared with max_image_pixels=1M, and what absl logged meanwhile."""
  folder = _build_folder(tmp_path_factory.mktemp('photos'))
  config = _folder_config(folder.root, tmp_path_factory.mktemp('tfds'),
                          max_image_pixels=FIXTURE_MAX_PIXELS)
  handler = _Messages()
  logging.getLogger('absl').addHandler(handler)
  try:
    with warnings.catch_warnings():  # Pillow's own warning about bomb.png, which is skipped.
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      builder = input_pipeline.get_builder(config)
  finally:
    logging.getLogger('absl').removeHandler(handler)
  stored = {}
  for split in builder.info.splits:
    for relpath, label, data in _stored(builder, split):
      assert relpath not in stored, f'{relpath} stored twice'
      stored[relpath] = (split, label, data)
  return folder, config, builder, stored, handler.messages


def _image(prepared, relpath) -> np.ndarray:
  return _decode(prepared[3][relpath][2])


# ---------------------------------------------------------------------------------------------
# The prepared dataset.


def test_every_usable_file_stored_once_with_its_directory_label(prepared):
  folder, _, builder, stored, _ = prepared
  classes = ['astronaut', 'chelsea', 'coffee']
  assert builder.info.features['label'].names == classes
  assert input_pipeline.num_classes(builder) == 3
  assert input_pipeline.supervised_keys(builder) == ('image', 'label')
  usable = {p for p, fate in folder.fate.items() if fate != SKIPPED}
  assert set(stored) == usable
  for relpath, (split, label, _) in stored.items():
    split_dir, class_dir = relpath.split('/')[:2]
    assert (split, label) == (split_dir, classes.index(class_dir))
  for split in ('train', 'val'):
    assert builder.info.splits[split].num_examples == sum(
        p.startswith(split + '/') for p in usable)


def test_fine_files_are_stored_byte_for_byte(prepared):
  folder, _, _, stored, _ = prepared
  for relpath, fate in folder.fate.items():
    if fate == KEPT:
      assert stored[relpath][2] == folder.raw[relpath], relpath
    elif fate == CONVERTED:
      assert stored[relpath][2] != folder.raw[relpath], relpath


def test_bad_files_json_lists_skipped_and_converted(prepared):
  folder, _, builder, _, _ = prepared
  with open(os.path.join(builder.data_dir, image_folder.BAD_FILES)) as f:
    bad = json.load(f)
  assert bad['root'] == folder.root
  assert set(bad['skipped']) == {p for p, fate in folder.fate.items() if fate == SKIPPED}
  assert set(bad['converted']) == {p for p, fate in folder.fate.items() if fate == CONVERTED}


def test_preparation_logs_a_summary_and_every_bad_file(prepared):
  folder, _, builder, _, messages = prepared
  skipped = sum(fate == SKIPPED for fate in folder.fate.values())
  converted = sum(fate == CONVERTED for fate in folder.fate.values())
  summary = [m for m in messages if 'at preparation' in m]
  assert len(summary) == 1
  assert f'{skipped} of {len(folder.fate)} files skipped and {converted} converted' in summary[0]
  assert os.path.join(builder.data_dir, image_folder.BAD_FILES) in summary[0]
  listing = '\n'.join(m for m in messages if 'bad files' in m)
  for relpath, fate in folder.fate.items():
    if fate != KEPT:
      assert f'{fate} {relpath}:' in listing


def test_prepared_once_then_reused_with_a_log_line(prepared, absl_messages):
  folder, config, builder, _, _ = prepared
  info = os.path.join(builder.data_dir, 'dataset_info.json')
  before = os.stat(info).st_mtime_ns
  again = input_pipeline.get_builder(config)
  assert again.data_dir == builder.data_dir
  assert os.stat(info).st_mtime_ns == before
  skipped = sum(fate == SKIPPED for fate in folder.fate.values())
  assert any(f'{skipped} files were skipped' in m and image_folder.BAD_FILES in m
             for m in absl_messages)


# ---------------------------------------------------------------------------------------------
# Each bad-data case.


def _note(prepared, relpath) -> str:
  with open(os.path.join(prepared[2].data_dir, image_folder.BAD_FILES)) as f:
    bad = json.load(f)
  return bad['skipped'].get(relpath) or bad['converted'][relpath]


def test_truncated_jpeg_skipped(prepared):
  for name in ('truncated.jpg', 'truncated_tail.jpg'):
    relpath = f'train/chelsea/{name}'
    assert relpath not in prepared[3]
    assert _note(prepared, relpath).startswith('truncated')
    # Independent evidence: Pillow refuses to fully decode it.
    with pytest.raises(OSError):
      Image.open(io.BytesIO(prepared[0].raw[relpath])).load()


def test_empty_file_skipped(prepared):
  assert 'train/chelsea/empty.jpg' not in prepared[3]
  assert _note(prepared, 'train/chelsea/empty.jpg').startswith('empty')


def test_non_image_files_skipped(prepared):
  for relpath in ('train/chelsea/notes.txt', 'train/chelsea/.DS_Store'):
    assert relpath not in prepared[3]
    assert _note(prepared, relpath) == 'not an image'


def test_cmyk_jpeg_converted_to_rgb_jpeg(prepared):
  relpath = 'train/chelsea/cmyk.jpg'
  stored = prepared[3][relpath][2]
  assert stored[:3] == b'\xff\xd8\xff'
  assert Image.open(io.BytesIO(stored)).mode == 'RGB'
  expected = np.asarray(Image.open(io.BytesIO(prepared[0].raw[relpath])).convert('RGB'), float)
  diff = np.abs(_image(prepared, relpath).astype(float) - expected)
  assert diff.mean() < 3 and np.percentile(diff, 99) < 20
  assert 'CMYK' in _note(prepared, relpath)


@pytest.mark.parametrize('relpath', ['train/astronaut/grey.png', 'val/chelsea/grey.jpg'])
def test_grey_images_kept_and_decoded_to_three_equal_channels(prepared, relpath):
  folder, _, _, stored, _ = prepared
  assert stored[relpath][2] == folder.raw[relpath]
  image = _image(prepared, relpath)
  assert image.shape == (40, 48, 3)
  assert np.array_equal(image[..., 0], image[..., 1])
  assert np.array_equal(image[..., 0], image[..., 2])
  if relpath.endswith('.png'):
    assert np.array_equal(image[..., 0], folder.arrays[relpath])
  else:  # TF's JPEG decoder (fast integer IDCT) agrees with Pillow's to within a few levels.
    pillow = np.asarray(Image.open(io.BytesIO(folder.raw[relpath])))
    diff = np.abs(image[..., 0].astype(int) - pillow)
    assert pillow.ndim == 2 and diff.mean() < 1.5 and diff.max() <= 10


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  a = alpha.astype(float)[..., None] / 255
  return rgb.astype(float) * a + 255 * (1 - a)


def test_transparent_pngs_composited_on_white(prepared):
  folder = prepared[0]
  rgba = folder.arrays['train/chelsea/rgba.png']
  la = folder.arrays['train/chelsea/la.png']
  indices = np.asarray(folder.palette)
  colours = np.asarray(folder.palette.getpalette(), np.uint8).reshape(-1, 3)[indices]
  expected = {
      'train/chelsea/rgba.png': _on_white(rgba[..., :3], rgba[..., 3]),
      'train/chelsea/la.png': _on_white(np.repeat(la[..., :1], 3, -1), la[..., 1]),
      'train/chelsea/palette.png': np.where((indices == 0)[..., None], 255, colours),
  }
  for relpath, want in expected.items():
    assert prepared[3][relpath][2][:4] == b'\x89PNG'
    assert Image.open(io.BytesIO(prepared[3][relpath][2])).mode in ('RGB', 'L')
    assert np.abs(_image(prepared, relpath) - want).max() <= 1, relpath
  assert (np.asarray(folder.palette) == 0).any()
  assert np.abs(_image(prepared, 'train/chelsea/rgba.png')[:, 0] - 255).max() <= 1


def test_opaque_alpha_channel_kept(prepared):
  folder, _, _, stored, _ = prepared
  relpath = 'train/chelsea/opaque_rgba.png'
  assert stored[relpath][2] == folder.raw[relpath]
  assert np.array_equal(_image(prepared, relpath), folder.arrays[relpath][..., :3])


def test_16bit_png_converted_to_8bit(prepared):
  folder = prepared[0]
  relpath = 'train/astronaut/sixteen.png'
  assert Image.open(io.BytesIO(folder.raw[relpath])).mode.startswith('I')
  expected = np.round(folder.arrays[relpath] / 257).astype(np.uint8)
  assert list(expected[0, :4]) == [0, 255, 0, 1]
  image = _image(prepared, relpath)
  for channel in range(3):
    assert np.array_equal(image[..., channel], expected)


def test_small_image_kept_and_cropped_whole_by_the_train_transform(prepared):
  folder, _, _, stored, _ = prepared
  relpath = 'train/astronaut/tiny.jpg'
  encoded = tf.constant(stored[relpath][2])
  assert stored[relpath][2] == folder.raw[relpath]
  assert _decode(stored[relpath][2]).shape == (15, 20, 3)
  rescaled = {s: input_pipeline.to_uint8(input_pipeline.rescale(input_pipeline.decode(encoded),
                                                                s)).numpy()
              for s in range(32, 41)}
  for seed in range(4):
    crop = input_pipeline.train_transform(encoded, tf.constant([seed, 7], tf.int64),
                                          scale=(32, 40), image_size=32, flip=False).numpy()
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    assert any(np.array_equal(big[y:y + 32, x:x + 32], crop) for big in rescaled.values()
               for y in range(big.shape[0] - 31) for x in range(big.shape[1] - 31))


def test_huge_jpeg_downscaled_to_max_image_pixels(prepared):
  folder = prepared[0]
  relpath = 'train/astronaut/huge.jpg'
  image = _image(prepared, relpath)
  height, width = image.shape[:2]
  assert width * height <= FIXTURE_MAX_PIXELS
  assert width * height > 0.99 * FIXTURE_MAX_PIXELS
  assert abs(width / height - 1.5) < 0.005
  assert prepared[3][relpath][2][:3] == b'\xff\xd8\xff'
  block = width / folder.huge_colours.shape[1]
  centres = np.round((np.arange(folder.huge_colours.shape[0]) + 0.5) * block).astype(int)
  centres_x = np.round((np.arange(folder.huge_colours.shape[1]) + 0.5) * block).astype(int)
  sampled = image[centres][:, centres_x].astype(int)
  assert np.abs(sampled - folder.huge_colours).max() <= 8
  assert '12000x8000 downscaled to' in _note(prepared, relpath)


def test_default_max_image_pixels_downscales_a_45_megapixel_jpeg(tmp_path):
  image, _ = _blocks(9_000, 5_000, 1_000, seed=3)
  path = tmp_path / 'big.jpg'
  _save(str(path), image, 'JPEG', quality=90)
  verdict = image_folder.check_file(str(path))
  assert verdict.fix == 'converted' and verdict.image is not None
  with image_folder.pillow_settings():
    out = Image.open(io.BytesIO(verdict.image))
  width, height = out.size
  assert out.format == 'JPEG'
  assert 0.999 * image_folder.DEFAULT_MAX_IMAGE_PIXELS < width * height <= (
      image_folder.DEFAULT_MAX_IMAGE_PIXELS)
  assert abs(width / height - 9 / 5) < 0.001


def test_decompression_bombs_skipped(prepared):
  for relpath in ('train/coffee/bomb.png', 'train/coffee/bigger_bomb.png'):
    assert relpath not in prepared[3]
    assert _note(prepared, relpath).startswith('too large')
  assert Image.MAX_IMAGE_PIXELS != image_folder.BOMB_PIXELS  # Restored after preparation.


def test_formats_tf_does_not_read_converted_to_png(prepared):
  folder, _, _, stored, _ = prepared
  for relpath in ('train/coffee/photo.tiff', 'train/coffee/photo.webp'):
    assert stored[relpath][2][:4] == b'\x89PNG'
    assert np.array_equal(_image(prepared, relpath), folder.arrays[relpath]), relpath
  bits = folder.arrays['train/coffee/bits.bmp']
  with pytest.raises(tf.errors.InvalidArgumentError):
    _decode(folder.raw['train/coffee/bits.bmp'])
  assert np.array_equal(_image(prepared, 'train/coffee/bits.bmp'),
                        np.repeat(bits[..., None] * np.uint8(255), 3, -1))
  assert stored['train/coffee/photo.gif'][2] == folder.raw['train/coffee/photo.gif']


# ---------------------------------------------------------------------------------------------
# Strict mode, failed preparations and the layout.


def _small_folder(root, extra: dict[str, bytes]):
  """Two classes of two good photos each in train, one in val; plus `extra` {relpath: bytes}."""
  photos = _photos()
  for i, name in enumerate(('chelsea', 'coffee')):
    for j in range(2):
      _save(os.path.join(root, 'train', name, f'{j}.jpg'), _crop(photos[name], j), 'JPEG')
    _save(os.path.join(root, 'val', name, 'v.jpg'), _crop(photos[name], 3 + i), 'JPEG')
  for relpath, data in extra.items():
    _write(os.path.join(root, relpath), data)


def _encoded(image, fmt, **kwargs) -> bytes:
  buffer = io.BytesIO()
  (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _assert_nothing_prepared(config):
  cfg = image_folder.builder_config(config.dataset[len(image_folder.PREFIX):],
                                    config.strict_data, config.max_image_pixels)
  assert not image_folder.ImageFolder(config=cfg, data_dir=config.data_dir).is_prepared()
  leftovers = [f for _, _, files in os.walk(config.data_dir) for f in files]
  assert 'dataset_info.json' not in leftovers and not any('tfrecord' in f for f in leftovers)


def _strict_cases():
  photo = _crop(_photos()['chelsea'], 2)
  jpeg = _encoded(_crop(_photos()['chelsea'], 4, size=(96, 80)), 'JPEG')
  rgba = np.dstack([photo, np.full((40, 48), 100, np.uint8)])
  return {
      'truncated': ('broken.jpg', jpeg[:-200], 'is a truncated JPEG'),
      'empty': ('empty.jpg', b'', 'is an empty (zero-byte) file'),
      'not_image': ('notes.txt', b'not a photo', 'is not an image'),
      'cmyk': ('cmyk.jpg', _encoded(Image.fromarray(photo).convert('CMYK'), 'JPEG'),
               'is a CMYK JPEG'),
      'alpha': ('alpha.png', _encoded(rgba, 'PNG'), 'is a PNG with transparency (RGBA)'),
      'sixteen': ('sixteen.png', _encoded(np.full((8, 8), 3000, np.uint16), 'PNG'),
                  'is a 16-bit PNG (I;16)'),
      'huge': ('huge.jpg', _encoded(np.zeros((100, 120, 3), np.uint8), 'JPEG'),
               'is a 120x100 JPEG, over config.max_image_pixels=5000'),
      'tiff': ('photo.tiff', _encoded(photo, 'TIFF'), 'is a TIFF, not JPEG, PNG, GIF or BMP'),
  }


@pytest.mark.parametrize('case', sorted(_strict_cases()))
def test_strict_mode_fails_naming_the_file_and_prepares_nothing(tmp_path, case):
  name, data, problem = _strict_cases()[case]
  root = tmp_path / 'photos'
  _small_folder(str(root), {f'train/coffee/{name}': data})
  max_pixels = 5000 if case == 'huge' else image_folder.DEFAULT_MAX_IMAGE_PIXELS
  config = _folder_config(root, tmp_path / 'tfds', strict_data=True, max_image_pixels=max_pixels)
  with pytest.raises(errors.ConfigError) as error:
    input_pipeline.get_builder(config)
  path = os.path.join(str(root), 'train', 'coffee', name)
  assert str(error.value).startswith(f'config.strict_data=True: {path} {problem}')
  assert 'strict_data=False' in str(error.value)
  _assert_nothing_prepared(config)
  if case == 'truncated':  # The failed attempt does not get in the way of a lenient one.
    config.strict_data = False
    builder = input_pipeline.get_builder(config)
    assert builder.info.splits['train'].num_examples == 4


def test_strict_mode_accepts_grey_small_and_opaque_images(tmp_path):
  photo = _crop(_photos()['coffee'], 2)
  extra = {
      'train/coffee/grey.png': _encoded(Image.fromarray(photo).convert('L'), 'PNG'),
      'train/coffee/grey.jpg': _encoded(Image.fromarray(photo).convert('L'), 'JPEG'),
      'train/coffee/tiny.jpg': _encoded(photo[:15, :20], 'JPEG'),
      'train/coffee/opaque.png': _encoded(np.dstack([photo, np.full((40, 48), 255, np.uint8)]),
                                          'PNG'),
  }
  _small_folder(str(tmp_path / 'photos'), extra)
  config = _folder_config(tmp_path / 'photos', tmp_path / 'tfds', strict_data=True)
  builder = input_pipeline.get_builder(config)
  stored = {relpath: data for relpath, _, data in _stored(builder, 'train')}
  assert len(stored) == 8
  for relpath, data in extra.items():
    assert stored[relpath] == data
  with open(os.path.join(builder.data_dir, image_folder.BAD_FILES)) as f:
    assert json.load(f) == {'root': str(tmp_path / 'photos'), 'skipped': {}, 'converted': {}}


def test_class_without_a_usable_image_fails(tmp_path):
  root = tmp_path / 'photos'
  _small_folder(str(root), {'train/dog/notes.txt': b'todo: add dogs', 'train/dog/x.jpg': b''})
  config = _folder_config(root, tmp_path / 'tfds')
  with pytest.raises(errors.ConfigError,
                     match=r"^config.dataset='folder:.*/train/dog has no usable image \(skipped: "
                     r'notes.txt \(not an image\), x.jpg \(empty'):
    input_pipeline.get_builder(config)
  _assert_nothing_prepared(config)


def test_a_class_added_after_preparation_is_named_with_the_copy_to_delete(tmp_path):
  """The prepared copy has the folder's old classes: reusing it would train on two classes
  and say num_classes=3 is wrong."""
  root = tmp_path / 'photos'
  _small_folder(str(root), {})
  config = _folder_config(root, tmp_path / 'tfds')
  prepared = input_pipeline.get_builder(config).data_dir
  _save(str(root / 'train' / 'astronaut' / '0.jpg'), _crop(_photos()['astronaut'], 0), 'JPEG')
  with pytest.raises(errors.ConfigError) as error:
    input_pipeline.get_builder(config)
  assert str(error.value) == (
      f"config.dataset='folder:{root}': the folder has 3 classes but its prepared copy in "
      f'{prepared} has 2: since it was prepared, it gained astronaut. Delete {prepared} to '
      'prepare the folder again with its classes now.')
  shutil.rmtree(prepared)
  assert input_pipeline.get_builder(config).info.features['label'].names == [
      'astronaut', 'chelsea', 'coffee']


def test_layout_errors(tmp_path):
  def error(root, **overrides):
    with pytest.raises(errors.ConfigError) as e:
      input_pipeline.get_builder(_folder_config(root, tmp_path / 'tfds', **overrides))
    return str(e.value)

  missing = tmp_path / 'missing'
  assert error(missing).startswith(f"config.dataset='folder:{missing}': {missing} is not a "
                                   'directory; expected ROOT/<split>/<class>/<image files>')
  flat = tmp_path / 'flat'
  _save(str(flat / 'cat' / '1.jpg'), _crop(_photos()['chelsea'], 0), 'JPEG')
  message = error(flat)
  assert message.startswith(f"config.dataset='folder:{flat}': no split directory")
  assert f'move them into {flat / "train"}' in message
  unknown = tmp_path / 'unknown'
  _small_folder(str(unknown), {'val/dog/1.jpg': _encoded(_crop(_photos()['coffee'], 0), 'JPEG')})
  message = error(unknown)
  assert message.startswith(f"config.dataset='folder:{unknown}': {unknown / 'val' / 'dog'} is a "
                            'class the train split does not have')
  assert error(unknown.parent / 'flat', dataset='folder:').startswith("config.dataset='folder:'")
  good = tmp_path / 'good'
  _small_folder(str(good), {})
  assert error(good, eval_split='validation').startswith(
      "config.eval_split='validation': the image folder")
  assert error(good, max_image_pixels=0).startswith('config.max_image_pixels=0:')


def test_config_name_tells_folders_and_settings_apart(tmp_path):
  names = {image_folder.builder_config(str(tmp_path / 'a')).name,
           image_folder.builder_config(str(tmp_path / 'b' / 'a')).name,
           image_folder.builder_config(str(tmp_path / 'a'), strict=True).name,
           image_folder.builder_config(str(tmp_path / 'a'), max_image_pixels=10).name}
  assert len(names) == 4
  assert image_folder.builder_config(str(tmp_path / 'a') + '/').name == (
      image_folder.builder_config(str(tmp_path / 'a')).name)
  assert all(name.startswith('a-') for name in names)


# ---------------------------------------------------------------------------------------------
# Through the training and evaluation input pipeline.


def test_train_and_eval_batches_from_the_folder(prepared):
  folder, config, builder, stored, _ = prepared
  config = config.copy_and_resolve_references()
  config.num_classes = 3
  config.image_size = 32
  config.train_scale = (32, 40)
  config.batch_size = 16
  config.eval_batch_size = 8
  config.cache = False
  batch = next(input_pipeline.as_numpy(input_pipeline.train_dataset(builder, config)))
  assert batch['image'].shape == (8, 2, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32 and set(batch['label'].ravel()) <= {0, 1, 2}
  ds, num_batches = input_pipeline.eval_dataset(builder, config)
  labels = [label for b in input_pipeline.as_numpy(ds)
            for label, mask in zip(b['label'].ravel(), b['mask'].ravel()) if mask]
  want = sorted(label for split, label, _ in stored.values() if split == 'val')
  assert sorted(labels) == want == [1, 1, 1, 2, 2]
  assert num_batches == 1
