"""A folder of images as a tfds dataset: `config.dataset='folder:/path/to/root'`.

ROOT/<split>/<class>/<image files>, e.g. ROOT/train/cat/1.jpg and ROOT/val/dog/x.png. Every
subdirectory of ROOT that holds class directories is a split; the classes are the sorted class
directories of `train` (else of the first split), and every other split uses them or a subset.

The folder is prepared once, like any tfds dataset, into TFRecords (with ArrayRecord twins of the
train split's shards, `random_access`) under the tfds data_dir, then read by the same code as
ImageNet, so sharding across hosts and resumption behave identically. Preparation is where bad
data is dealt with, once and by name: each file is fully decoded with Pillow, then kept byte for
byte, converted to something `tf.io.decode_image` reads as the paper's RGB input, or skipped.
Truncated, empty and non-image files are skipped; CMYK, transparent, 16-bit, oversized and
non-JPEG/PNG/GIF/BMP images are converted. Grey and small images are kept: the input pipeline
repeats grey to RGB and rescales the smallest side up to S. The names of the skipped and
converted files are logged and written to `bad_files.json` next to the prepared dataset. With
`config.strict_data` preparation fails instead, naming the files; tfds writes into a temporary
directory, so a failed preparation leaves nothing that looks prepared.

The dataset's name hashes ROOT's absolute path, strict_data and max_image_pixels, so two folders
(or two settings) never share a prepared copy. Files added to ROOT later are not seen until the
prepared copy (its path is logged) is deleted; a class directory added or removed since is
refused, naming that copy.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
from typing import Iterable, Iterator, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax import default_config
from vgg_jax import errors
from vgg_jax.datasets import random_access


PREFIX = 'folder:'
DEFAULT_MAX_IMAGE_PIXELS = default_config.get_config().max_image_pixels
# Larger than any photograph: a header claiming more pixels is a decompression bomb.
BOMB_PIXELS = 1_000_000_000
BAD_FILES = 'bad_files.json'
TF_FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP')
# Modes that `tf.io.decode_image(..., channels=3)` turns into the right RGB image as stored.
KEPT_MODES = {'JPEG': ('L', 'RGB'), 'PNG': ('1', 'L', 'P', 'RGB', 'LA', 'RGBA'),
              'GIF': ('L', 'P', 'RGB', 'RGBA'), 'BMP': ('1', 'L', 'P', 'RGB', 'RGBA')}
ALPHA_MODES = ('RGBA', 'LA', 'PA', 'RGBa', 'La')
JPEG_QUALITY = 95
LOGGED_FILES = 1000


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """Which folder, and how bad files are treated (both change the prepared data)."""
  root: str = ''
  strict: bool = False
  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def builder_config(root: str, strict: bool = False,
                   max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageFolderConfig:
  root = os.path.abspath(os.path.expanduser(root))
  key = f'{root}\0strict={bool(strict)}\0max_image_pixels={int(max_image_pixels)}'
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  slug = re.sub(r'[^A-Za-z0-9_]', '_', os.path.basename(root))[:40] or 'root'
  return ImageFolderConfig(name=f'{slug}-{digest}', description=f'The images under {root}.',
                           root=root, strict=bool(strict), max_image_pixels=int(max_image_pixels))


# ---------------------------------------------------------------------------------------------
# The layout.


@dataclasses.dataclass(frozen=True)
class Layout:
  """The splits under ROOT and the class directories of each; `classes` index the labels."""
  classes: tuple[str, ...]
  splits: dict[str, tuple[str, ...]]


def _subdirs(path: str) -> list[str]:
  with os.scandir(path) as entries:
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith('.'))


def scan_layout(root: str) -> Layout:
  """ROOT's splits and classes from its first two levels of directories, checked."""
  field = f'config.dataset={PREFIX + root!r}'
  expected = ('expected ROOT/<split>/<class>/<image files>, e.g. ROOT/train/cat/1.jpg and '
              'ROOT/val/cat/2.jpg')
  if not os.path.isdir(root):
    raise errors.ConfigError(f'{field}: {root} is not a directory; {expected}.')
  splits = {}
  for name in _subdirs(root):
    classes = _subdirs(os.path.join(root, name))
    if classes:
      splits[name] = tuple(classes)
  if not splits:
    hint = ''
    if _subdirs(root):
      hint = (f' Its subdirectories hold no class directories: if they are the classes, move '
              f'them into {os.path.join(root, "train")}.')
    raise errors.ConfigError(
        f'{field}: no split directory with class directories in {root}; {expected}.{hint}')
  for name in splits:
    if not re.fullmatch(r'[A-Za-z0-9_]+', name):
      raise errors.ConfigError(
          f'{field}: split directory {os.path.join(root, name)!r} is not a valid tfds split '
          'name; use letters, digits and _ only (e.g. train, val, test).')
  reference = 'train' if 'train' in splits else next(iter(splits))
  classes = splits[reference]
  for name, split_classes in splits.items():
    unknown = sorted(set(split_classes) - set(classes))
    if unknown:
      raise errors.ConfigError(
          f'{field}: {os.path.join(root, name, unknown[0])} is a class the {reference} split '
          f'does not have ({len(unknown)} such in {name}: {", ".join(unknown[:10])}); every '
          f'split must use the classes of {os.path.join(root, reference)} or a subset.')
  return Layout(classes=classes, splits=splits)


def _files(root: str, split: str, class_name: str) -> list[str]:
  """Every file under one class directory (recursively), as sorted paths relative to ROOT."""
  top = os.path.join(root, split, class_name)
  found = []
  for directory, dirnames, filenames in os.walk(top):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    found.extend(os.path.relpath(os.path.join(directory, f), root) for f in filenames)
  return sorted(p.replace(os.sep, '/') for p in found)


# ---------------------------------------------------------------------------------------------
# One file.


@dataclasses.dataclass(frozen=True)
class Verdict:
  """What preparation does with one file.

  image: the bytes to store (the file's own, or converted), None if skipped. problem: what is
  wrong, phrased to follow '<path> is' ('' if nothing is). note: the reason it is skipped or
  what was converted, for bad_files.json.
  """
  image: Optional[bytes]
  problem: str = ''
  note: str = ''
  fix: str = ''  # 'skipped' or 'converted' when there is a problem.


def _skip(problem: str, note: str) -> Verdict:
  return Verdict(None, problem, note, 'skipped')


@contextlib.contextmanager
def pillow_settings():
  """Full decoding that fails on truncation, and Pillow's bomb guard moved to BOMB_PIXELS."""
  from PIL import Image, ImageFile  # pylint: disable=g-import-not-at-top
  saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
  Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = BOMB_PIXELS, False
  try:
    yield
  finally:
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _sniff(data: bytes) -> str:
  """The format named by a file's first bytes, for files Pillow cannot even open."""
  for magic, name in ((b'\xff\xd8\xff', 'JPEG'), (b'\x89PNG', 'PNG'), (b'GIF8', 'GIF'),
                      (b'BM', 'BMP')):
    if data.startswith(magic):
      return name
  return 'image'


def _broken(fmt: str, error: Exception) -> Verdict:
  kind = 'truncated' if 'truncated' in str(error).lower() else 'corrupt'
  return _skip(f'a {kind} {fmt} ({error})', f'{kind}: {error}')


def _png_bit_depth(data: bytes) -> int:
  if data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR':
    return data[24]
  return 8


def _transparent(img) -> bool:
  """Whether some pixel is not fully opaque (an opaque alpha channel changes nothing)."""
  if img.mode not in ALPHA_MODES and 'transparency' not in img.info:
    return False
  if img.mode.startswith('I'):
    return False
  return img.convert('RGBA').getchannel('A').getextrema()[0] < 255


def _to_8bit(img, data: bytes):
  """16 bits per sample -> 8, as round(v / 257), which maps 0..65535 onto 0..255 exactly."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if img.mode.startswith('I'):
    values = np.asarray(img).astype(np.float64)
  else:  # Pillow already dropped the low byte of a 16-bit RGB(A) / LA PNG: decode it again.
    values = tf.io.decode_png(data, channels=0, dtype=tf.uint16).numpy().astype(np.float64)
    values = values[..., 0] if values.shape[-1] == 1 else values
  return Image.fromarray(np.clip(np.round(values / 257), 0, 255).astype(np.uint8))


def _on_white(img):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rgba = img.convert('RGBA')
  return Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)),
                               rgba).convert('RGB')


def _tf_decodes(data: bytes) -> bool:
  try:
    tf.io.decode_image(data, channels=3, expand_animations=False)
  except (tf.errors.OpError, ValueError):
    return False
  return True


def _fitted(width: int, height: int, max_pixels: int) -> tuple[int, int]:
  """The largest size with the same aspect ratio and at most max_pixels pixels."""
  ratio = math.sqrt(max_pixels / (width * height))
  return max(1, math.floor(width * ratio)), max(1, math.floor(height * ratio))


def check_file(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               strict: bool = False) -> Verdict:
  """The verdict on one file; never raises. strict: report problems without converting."""
  with pillow_settings():
    return _safe_check(path, max_pixels, strict)


def _safe_check(path: str, max_pixels: int, strict: bool) -> Verdict:
  """check_file, with `pillow_settings` held by the caller."""
  try:
    return _check(path, max_pixels, strict)
  except Exception as e:  # pylint: disable=broad-except  # One bad file must not stop the rest.
    return _skip(f'unreadable ({type(e).__name__}: {e})', f'unreadable: {type(e).__name__}: {e}')


def _check(path: str, max_pixels: int, strict: bool) -> Verdict:
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    return _skip(f'unreadable ({e.strerror})', f'unreadable: {e.strerror}')
  if not data:
    return _skip('an empty (zero-byte) file', 'empty: zero-byte file')
  try:
    img = Image.open(io.BytesIO(data))
  except UnidentifiedImageError:
    return _skip('not an image', 'not an image')
  except Image.DecompressionBombError as e:
    return _skip(f'a decompression bomb ({e})', f'too large: {e}')
  except Exception as e:  # pylint: disable=broad-except  # Pillow's plugins raise many types.
    return _broken(_sniff(data), e)
  fmt, mode, (width, height) = img.format or 'unknown', img.mode, img.size
  if width * height > BOMB_PIXELS:
    return _skip(f'a {width}x{height} {fmt}, over {BOMB_PIXELS} pixels (a decompression bomb?)',
                 f'too large: {width}x{height} {fmt}, over {BOMB_PIXELS} pixels')
  problems, notes = [], []
  big = width * height > max_pixels
  target = _fitted(width, height, max_pixels) if big else (width, height)
  if big:
    problems.append(f'a {width}x{height} {fmt}, over config.max_image_pixels={max_pixels}')
    if strict:
      return Verdict(None, problems[0], fix='converted')
    notes.append(f'{width}x{height} downscaled to {target[0]}x{target[1]}')
    if fmt == 'JPEG':
      img.draft(None, target)  # Decodes at 1/2, 1/4 or 1/8 scale when that is still >= target.
  try:
    img.load()
  except Exception as e:  # pylint: disable=broad-except
    return _broken(fmt, e)

  sixteen = mode.startswith('I') or _png_bit_depth(data) == 16
  if sixteen:
    problems.append(f'a 16-bit {fmt} ({mode})')
    notes.append(f'16-bit {mode} -> 8-bit')
  transparent = _transparent(img)
  if transparent:
    problems.append(f'a {fmt} with transparency ({mode})')
    notes.append(f'{mode} with transparency composited on white')
  elif not sixteen and mode not in KEPT_MODES.get(fmt, ('L', 'RGB')):
    problems.append(f'a {mode} {fmt}')
    notes.append(f'{mode} -> RGB')
  if fmt not in TF_FORMATS:
    problems.append(f'a {fmt}, not JPEG, PNG, GIF or BMP')
    notes.append(f'{fmt} is not JPEG, PNG, GIF or BMP')
  elif fmt in ('GIF', 'BMP') and not problems and not _tf_decodes(data):
    problems.append(f'a {mode} {fmt} that tf.io.decode_image does not read')
    notes.append(f'{mode} {fmt} not read by tf.io.decode_image')
  if not problems:
    return Verdict(data)
  if strict:
    return Verdict(None, '; '.join(problems), fix='converted')

  if sixteen:
    img = _to_8bit(img, data)
  if transparent:
    img = _on_white(img)
  if img.mode not in ('L', 'RGB'):
    img = img.convert('L' if img.mode in ('1', 'LA', 'La', 'F') else 'RGB')
  if img.size != target:
    img = img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
  out_format = 'JPEG' if fmt == 'JPEG' else 'PNG'
  buffer = io.BytesIO()
  img.save(buffer, out_format, **({'quality': JPEG_QUALITY} if out_format == 'JPEG' else {}))
  return Verdict(buffer.getvalue(), '; '.join(problems),
                 f'{"; ".join(notes)}; re-encoded as {out_format}', 'converted')


def _checked(paths: Iterable[str], max_pixels: int, strict: bool) -> Iterator[Verdict]:
  """check_file over `paths` on all cores (Pillow decodes without the GIL), in order."""
  workers = os.cpu_count() or 1
  pool = concurrent.futures.ThreadPoolExecutor(workers)
  pending = collections.deque()
  try:
    with pillow_settings():
      for path in paths:
        pending.append(pool.submit(_safe_check, path, max_pixels, strict))
        if len(pending) >= 4 * workers:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# The builder.


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The images of one folder; constructed with an `ImageFolderConfig` (see `builder_config`)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original bytes where decodable; bad files skipped or converted.'}

  def _info(self) -> tfds.core.DatasetInfo:
    labels = os.path.join(self._data_dir, 'label.labels.txt')
    if tf.io.gfile.exists(labels):  # Prepared: its classes, whatever ROOT holds now.
      label = tfds.features.ClassLabel(names_file=labels)
    else:
      label = tfds.features.ClassLabel(names=list(scan_layout(self.builder_config.root).classes))
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': label,
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is on disk already.
    layout = scan_layout(self.builder_config.root)
    return {split: self._generate_examples(split, classes)
            for split, classes in layout.splits.items()}

  def download_and_prepare(self, **kwargs):
    """tfds' preparation, then the bad files are logged (once, when this call prepared)."""
    self._bad_files = None
    super().download_and_prepare(**kwargs)
    if self._bad_files is not None:
      _log_bad_files(self.builder_config.root, self._bad_files, self._num_files,
                     os.path.join(self.data_dir, BAD_FILES))

  def _download_and_prepare(self, dl_manager, download_config):  # pylint: disable=arguments-differ
    bad_files = {'skipped': {}, 'converted': {}}
    self._bad_files, self._num_files = bad_files, 0
    super()._download_and_prepare(dl_manager, download_config)
    # self.data_dir is tfds' temporary directory, renamed only if preparation succeeds.
    with tf.io.gfile.GFile(os.path.join(self.data_dir, BAD_FILES), 'w') as f:
      json.dump({'root': self.builder_config.root, **bad_files}, f, indent=1, sort_keys=True)

  def _generate_examples(self, split: str, classes: tuple[str, ...]):
    config = self.builder_config
    root = config.root
    label_of = {name: i for i, name in enumerate(self.info.features['label'].names)}
    files = [(relpath, name) for name in classes for relpath in _files(root, split, name)]
    self._num_files += len(files)
    kept = collections.Counter()
    strict_problems = []
    verdicts = _checked((os.path.join(root, p) for p, _ in files), config.max_image_pixels,
                        config.strict)
    for (relpath, name), verdict in zip(files, verdicts):
      if verdict.problem and config.strict:
        strict_problems.append((relpath, verdict))
        continue
      if verdict.problem:
        self._bad_files[verdict.fix][relpath] = verdict.note
      if verdict.image is not None:
        kept[name] += 1
        yield relpath, {'image': verdict.image, 'label': label_of[name], 'file_name': relpath}
    if strict_problems:
      raise _strict_error(root, strict_problems)
    empty = [name for name in classes if not kept[name]]
    if empty:
      prefix = f'{split}/{empty[0]}/'
      skipped = [f'{p[len(prefix):]} ({why})' for p, why in self._bad_files['skipped'].items()
                 if p.startswith(prefix)]
      raise errors.ConfigError(
          f'config.dataset={PREFIX + root!r}: {os.path.join(root, split, empty[0])} has no '
          f'usable image (skipped: {", ".join(skipped[:10]) or "none, it is empty"}); add images '
          f'or remove the directory. {len(empty)} such class directories in {split}: '
          f'{", ".join(empty[:10])}.')


def _strict_error(root: str, problems: list[tuple[str, Verdict]]) -> Exception:
  for relpath, verdict in problems:
    logging.error('strict_data: %s is %s.', os.path.join(root, relpath), verdict.problem)
  relpath, verdict = problems[0]
  more = ''
  if len(problems) > 1:
    listed = ', '.join(p for p, _ in problems[1:11])
    more = f' {len(problems) - 1} more files have problems (all are logged): {listed}.'
  return errors.ConfigError(
      f'config.strict_data=True: {os.path.join(root, relpath)} is {verdict.problem}; fix or '
      'remove it, or set --config.strict_data=False to have such files '
      f'{verdict.fix} (and listed in {BAD_FILES}).{more}')


def _log_bad_files(root: str, bad: dict, num_files: int, where: str) -> None:
  skipped, converted = bad['skipped'], bad['converted']
  log = logging.warning if skipped or converted else logging.info
  log('Image folder %s: %d of %d files skipped and %d converted at preparation; listed in %s',
      root, len(skipped), num_files, len(converted), where)
  lines = [f'  skipped {p}: {why}' for p, why in sorted(skipped.items())]
  lines += [f'  converted {p}: {what}' for p, what in sorted(converted.items())]
  if lines:
    more = len(lines) - LOGGED_FILES
    logging.warning('Image folder %s, bad files:\n%s%s', root, '\n'.join(lines[:LOGGED_FILES]),
                    f'\n  ... and {more} more' if more > 0 else '')


def _check_classes_unchanged(builder: ImageFolder) -> None:
  """A ConfigError when ROOT's class directories are no longer those its prepared copy was
  made from: the copy would train and test on the old classes, and num_classes checks would
  name the wrong count. (Files added to existing classes are not checked: that needs a scan of
  every file; the module docstring says how to see them.)"""
  root = builder.builder_config.root
  if not os.path.isdir(root):
    return  # Moved or deleted since: the prepared copy is all there is.
  prepared = builder.info.features['label'].names
  now = scan_layout(root).classes
  if list(now) != list(prepared):
    added, removed = sorted(set(now) - set(prepared)), sorted(set(prepared) - set(now))
    change = '; '.join(part for part in (
        added and f'gained {", ".join(added[:10])}', removed and f'lost {", ".join(removed[:10])}')
                       if part) or 'reordered its classes'
    raise errors.ConfigError(
        f'config.dataset={PREFIX + root!r}: the folder has {len(now)} classes but its prepared '
        f'copy in {builder.data_dir} has {len(prepared)}: since it was prepared, it {change}. '
        f'Delete {builder.data_dir} to prepare the folder again with its classes now.')


def _log_prepared(builder: ImageFolder) -> None:
  where = os.path.join(builder.data_dir, BAD_FILES)
  try:
    with tf.io.gfile.GFile(where) as f:
      bad = json.load(f)
  except (tf.errors.NotFoundError, ValueError):
    return
  logging.info('Image folder %s, prepared in %s: %d files were skipped and %d converted at '
               'preparation; listed in %s', builder.builder_config.root, builder.data_dir,
               len(bad['skipped']), len(bad['converted']), where)


# ---------------------------------------------------------------------------------------------
# Entry point.


def is_image_folder(dataset: str) -> bool:
  return dataset.startswith(PREFIX)


def prepared_builder(config) -> ImageFolder:
  """The builder of `config.dataset='folder:ROOT'`, prepared into config.data_dir if need be."""
  root = config.dataset[len(PREFIX):]
  if not root:
    raise errors.ConfigError(
        f'config.dataset={config.dataset!r}: give the folder, e.g. folder:/data/photos, holding '
        'ROOT/<split>/<class>/<image files>.')
  max_pixels = config.max_image_pixels
  if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
    raise errors.ConfigError(
        f'config.max_image_pixels={max_pixels!r}: must be a positive int, e.g. 40_000_000.')
  builder = ImageFolder(config=builder_config(root, config.strict_data, max_pixels),
                        data_dir=config.data_dir)
  if builder.is_prepared():
    _check_classes_unchanged(builder)
    _log_prepared(builder)
  else:
    random_access.prepare(builder, random_access.split_names(config.train_split))
  splits = builder.info.splits.keys()
  for field in ('train_split', 'eval_split'):
    spec = config[field]
    missing = [name for name in random_access.split_names(spec) if name not in splits]
    if missing:
      raise errors.ConfigError(
          f'config.{field}={spec!r}: the image folder {builder.builder_config.root} has no '
          f'split {missing[0]!r}; its splits are {", ".join(sorted(splits))}.')
  return builder
