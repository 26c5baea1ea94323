"""The training split as ArrayRecord files, which training reads by index.

Training reads each epoch in a seeded permutation (`input_pipeline.train_dataset`), so it needs
example i without reading the ones before it. tfds stores a split as TFRecord shards, read front
to back, and evaluation streams them that way (tfds' `as_dataset` does not read ArrayRecord).
Each shard's *twin* holds the same records in the same order as ArrayRecord, read by index.
Twins live in one of two places:

- beside the shards, written in the same pass as them when vgg_jax prepares a dataset on a
  local data_dir (`prepare`): nothing is copied later;
- in a copy, written once by the first run that needs it into a writable directory
  (`config.random_access_dir`), for a dataset prepared elsewhere: read-only, or on gs://, where
  ArrayRecord can neither write nor read. Training never writes the dataset's directory.

A copy directory may be shared by processes and hosts (a local disk, or a mount such as NFS with
POSIX locks): one process writes, holding a lock the kernel releases when that process dies, the
others wait. Each file is written under a unique temporary name, flushed to disk and its records
counted against its source shard before it is renamed into place, so a file under its final
name is whole. The next writer removes temporaries left by a killed one and resumes at the first
file that is missing; a file found short when opened (truncated since) is written again.
"""

import contextlib
import dataclasses
import errno
import fcntl
import glob
import hashlib
import os
import socket
import uuid
from typing import Iterator, Optional, Sequence

from absl import logging
from array_record.python import array_record_data_source
from array_record.python import array_record_module
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax import default_config
from vgg_jax import errors
from vgg_jax import user_cache

ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD
WRITER_OPTIONS = 'group_size:1'  # One record per chunk: each read decodes only its record.
LOCK = '.lock'
TEMPORARY = '.tmp-'  # In the name of a file being written: '.NAME.tmp-HOST-PID-UUID'.


def default_dir() -> str:
  """Where copies go when config.random_access_dir is None: this host's cache."""
  return os.path.join(user_cache.cache_dir(), 'random_access')


def split_names(spec: str) -> tuple[str, ...]:
  """The splits a tfds split spec reads: 'train[:90%]+extra' -> ('train', 'extra')."""
  return tuple(name for name in (part.split('[')[0].strip() for part in (spec or '').split('+'))
               if name)


def twin_name(shard: str) -> str:
  """'x-train.tfrecord-00000-of-00008' (or a path ending so) -> its twin's name,
  'x-train.array_record-00000-of-00008'."""
  name = os.path.basename(os.fspath(shard))
  return tfds.core.file_adapters.convert_path_to_file_format(name, ARRAY_RECORD).name


# ---------------------------------------------------------------------------------------------
# At preparation: twins beside the shards.


class TwinWriter(tfds.core.ExampleWriter):
  """tfds' TFRecord shards, and an ArrayRecord twin of each shard of `splits`, in one pass."""

  def __init__(self, splits: Sequence[str]):
    super().__init__(file_format=tfds.core.FileFormat.TFRECORD)
    self.splits = tuple(splits)

  def write(self, path, examples):
    name = os.path.basename(os.fspath(path))
    try:
      split = tfds.core.naming.FilenameInfo.from_str(name).split
    except ValueError:  # A builder's own file names: no twin, the split is copied if need be.
      split = None
    if split not in self.splits:
      return super().write(path, examples)
    twin = _writer(os.path.join(os.path.dirname(os.fspath(path)), twin_name(name)))

    def both():
      for key, serialized in examples:
        twin.write(serialized)
        yield key, serialized

    try:
      return super().write(path, both())
    finally:
      twin.close()


def prepare(builder, splits: Sequence[str], download_config=None) -> None:
  """`builder.download_and_prepare`, with ArrayRecord twins of `splits`' shards written beside
  them when the data_dir is local. tfds' preparation writes into a temporary directory renamed
  when it succeeds, so twins and shards appear together or not at all."""
  if default_config.is_local_path(builder.data_dir):
    # tfds' hook for writing examples to other storage (DatasetBuilder._example_writer).
    builder._example_writer = lambda: TwinWriter(splits)  # pylint: disable=protected-access
  builder.download_and_prepare(download_config=download_config)


# ---------------------------------------------------------------------------------------------
# At training: the twins beside the shards, else a copy.


def source(builder, split: str, directory: Optional[str]):
  """The serialized examples of `split`, indexable (`source[i]`, `source.__getitems__(ids)`),
  in the order tfds stores them, from the ArrayRecord files in `location`."""
  where = location(builder, split, directory)
  instructions = [dataclasses.replace(i, filename=os.path.join(where, twin_name(i.filename)))
                  for i in builder.info.splits[split].file_instructions]
  return array_record_data_source.ArrayRecordDataSource(instructions)


def location(builder, split: str, directory: Optional[str]) -> str:
  """The directory of twins of every shard `split` reads: beside the shards if they are all
  there and whole, else the copy in `directory` (None: `default_dir()`), written first if need
  be."""
  shards = _shards(builder, split)
  if default_config.is_local_path(builder.data_dir) and not _missing(builder.data_dir, shards):
    return builder.data_dir
  return ensure_copy(builder, split, directory)


def copy_dir(builder, directory: Optional[str]) -> str:
  """DIRECTORY/<dataset>/<config>/<version>/<digest>: the digest names the dataset's directory
  and its splits' sizes, so another data_dir, or the dataset prepared anew, gets its own copy."""
  root = os.path.abspath(os.path.expanduser(directory or default_dir()))
  data_dir = os.fspath(builder.data_dir)
  relative = data_dir[len(os.fspath(builder.data_dir_root)):].strip('/')
  splits = sorted((s.name, int(s.num_bytes), tuple(s.shard_lengths))
                  for s in builder.info.splits.values())
  digest = hashlib.sha256(repr((data_dir, splits)).encode()).hexdigest()[:12]
  return os.path.join(root, relative, digest)


def ensure_copy(builder, split: str, directory: Optional[str]) -> str:
  """The copy of `split`'s shards in `copy_dir`, written (or completed) first if need be, by one
  process at a time. Returns its directory."""
  where = copy_dir(builder, directory)
  shards = _shards(builder, split)
  if not _missing(where, shards):
    return where
  field = f'config.random_access_dir={directory!r}'
  size = tfds.core.units.Size(sum(int(builder.info.splits[name].num_bytes)
                                  for name in split_names(split)))
  try:
    os.makedirs(where, exist_ok=True)
    lock = os.open(os.path.join(where, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
  except OSError as e:
    raise errors.ConfigError(
        f'{field}: cannot write {where} ({e.strerror or e}), where training keeps the '
        f'ArrayRecord copy of {builder.name} {split!r} ({size}) it reads by index; set it to a '
        'writable local directory, or one every host mounts.') from e
  with _locked(lock, where):
    _remove_temporaries(where)
    missing = _missing(where, shards)
    if missing:
      logging.info('Copying %d of the %d TFRecord shards of %s %r (%s in all) from %s into %s '
                   'as ArrayRecord, which training reads by index: the dataset has no '
                   'ArrayRecord files ArrayRecord can open, and training never writes its '
                   'directory.', len(missing), len(shards), builder.name, split, size,
                   builder.data_dir, where)
    for shard, num_records in missing:
      target = os.path.join(where, twin_name(shard))
      try:
        _copy_shard(shard, target, num_records)
      except (OSError, RuntimeError) as e:  # ArrayRecord's writer raises RuntimeError.
        why = getattr(e, 'strerror', None) or e
        raise errors.ConfigError(
            f'{field}: writing {target} failed ({why}); the copy of {builder.name} {split!r} '
            f'needs {size} there. Free space or choose another directory; a rerun resumes '
            'with this file.') from e
  return where


def _missing(where: str, shards: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
  """The shards whose twin in `where` is absent, short or unreadable."""
  return [(shard, n) for shard, n in shards if not _holds(os.path.join(where, twin_name(shard)), n)]


def _shards(builder, split: str) -> list[tuple[str, int]]:
  """(path, number of records) of every TFRecord shard of the splits `split` reads."""
  return [(os.path.join(os.fspath(builder.data_dir), name), length)
          for info in (builder.info.splits[name] for name in split_names(split))
          for name, length in zip(info.filenames, info.shard_lengths)]


def _holds(path: str, num_records: int) -> bool:
  """Whether `path` is a readable ArrayRecord file of `num_records` records."""
  if not os.path.exists(path):
    return False
  reader = array_record_module.ArrayRecordReader(path)
  if not reader.ok():  # Truncated or corrupt (closing such a reader raises).
    return False
  count = reader.num_records()
  reader.close()
  return count == num_records


def _writer(path: str) -> array_record_module.ArrayRecordWriter:
  writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
  if not writer.ok():
    raise OSError(errno.EIO, f'ArrayRecord cannot write {path}')
  return writer


@contextlib.contextmanager
def _locked(fd: int, where: str) -> Iterator[None]:
  """Holds an exclusive lock on `fd`, waiting for its holder (named in the log) if need be."""
  try:
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      holder = os.pread(fd, 256, 0).decode(errors='replace') or 'another process'
      logging.info('Waiting for %s, which is writing the ArrayRecord copy in %s.', holder, where)
      fcntl.lockf(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{socket.gethostname()} (pid {os.getpid()})'.encode(), 0)
    yield
  finally:
    os.close(fd)  # Releases the lock.


def _remove_temporaries(where: str) -> None:
  """Removes files left by writers that died (none is writing: the caller holds the lock)."""
  for path in glob.glob(os.path.join(glob.escape(where), f'.*{TEMPORARY}*')):
    logging.info('Removing %s, left by a copy that was stopped.', path)
    os.remove(path)


def _copy_shard(shard: str, target: str, num_records: int) -> None:
  """Writes the records of the TFRecord `shard` to the ArrayRecord `target`, whole or not at
  all: under a unique temporary name, flushed and counted, then renamed."""
  unique = f'{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  temporary = os.path.join(os.path.dirname(target),
                           f'.{os.path.basename(target)}{TEMPORARY}{unique}')
  writer = _writer(temporary)
  try:
    for batch in _records(shard):
      for record in batch:
        writer.write(record)
    writer.close()
    _fsync(temporary)
    if not _holds(temporary, num_records):
      raise OSError(errno.EIO, f'{temporary}: not the {num_records} records of {shard} once '
                    'written; is the disk full?')
    os.replace(temporary, target)
    _fsync(os.path.dirname(target))
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(temporary)
    raise


def _records(shard: str) -> Iterator:
  """The serialized records of a TFRecord shard (anywhere tf.io.gfile reads), in batches."""
  ds = tf.data.TFRecordDataset(shard, buffer_size=16 << 20).batch(1024).prefetch(2)
  return ds.as_numpy_iterator()


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
