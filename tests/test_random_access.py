"""The training split read by index: ArrayRecord twins written at preparation, or a copy that
training writes once outside the dataset's directory, shared by processes, resumed after a kill,
rebuilt when truncated; training on read-only and remote data_dirs.

The reference for the records is TensorFlow's TFRecord reader over the shards front to back (the
order tfds stores them in); the dataset is scikit-learn's digits with its train split in 3
shards, prepared by tfds alone, as a dataset prepared elsewhere is.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import logging as absl_logging
from array_record.python import array_record_module
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax import config_validation
from vgg_jax import errors
from vgg_jax import input_pipeline
from vgg_jax.datasets import random_access

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS = 3
DIGITS_TRAIN = 1437


def prepare_digits(data_dir: str, twins: bool):
  """sklearn_digits in `data_dir`, each split in SHARDS shards; ArrayRecord twins of the train
  shards if `twins` (as vgg_jax prepares), else TFRecord alone (as tfds does)."""
  builder = tfds.builder('sklearn_digits', data_dir=data_dir)
  download_config = tfds.download.DownloadConfig(num_shards=SHARDS)
  if twins:
    random_access.prepare(builder, ('train',), download_config)
  else:
    builder.download_and_prepare(download_config=download_config)
  return builder


@pytest.fixture(scope='module')
def plain(tmp_path_factory):
  return prepare_digits(str(tmp_path_factory.mktemp('plain')), twins=False)


@pytest.fixture(scope='module')
def twinned(tmp_path_factory):
  return prepare_digits(str(tmp_path_factory.mktemp('twinned')), twins=True)


def train_shards(builder) -> list[str]:
  return [os.path.join(builder.data_dir, name) for name in builder.info.splits['train'].filenames]


def tfrecords(paths) -> list[bytes]:
  return list(tf.data.TFRecordDataset(paths).as_numpy_iterator())


@pytest.fixture(scope='module')
def reference(plain) -> list[bytes]:
  """The train split's records, front to back, by TensorFlow's TFRecord reader."""
  records = tfrecords(train_shards(plain))
  assert len(records) == DIGITS_TRAIN and len(train_shards(plain)) == SHARDS
  return records


@pytest.fixture
def absl_info():
  """What absl logs during the test, INFO and up."""
  messages = []

  class Handler(logging.Handler):
    def emit(self, record):
      messages.append(record.getMessage())

  handler, logger = Handler(), logging.getLogger('absl')
  level = logger.level
  absl_logging.set_verbosity(absl_logging.INFO)
  logger.addHandler(handler)
  yield messages
  logger.removeHandler(handler)
  logger.setLevel(level)


def all_records(source) -> list[bytes]:
  return list(source.__getitems__(list(range(len(source)))))


def file_hashes(directory) -> dict[str, str]:
  """sha256 of every file under `directory`, by relative path."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), 'rb') as f:
        out[os.path.relpath(os.path.join(root, name), directory)] = (
            hashlib.sha256(f.read()).hexdigest())
  return out


def twins_in(directory) -> dict[str, tuple[int, int]]:
  """(inode, mtime) of each ArrayRecord file in `directory`: changes if it is written again."""
  return {name: (os.stat(os.path.join(directory, name)).st_ino,
                 os.stat(os.path.join(directory, name)).st_mtime_ns)
          for name in sorted(os.listdir(directory))
          if '.array_record-' in name and not name.startswith('.')}


# ---------------------------------------------------------------------------------------------
# Twins written at preparation.


def test_preparation_writes_array_record_twins_of_the_train_shards_and_nothing_else(
    plain, twinned):
  plain_files, twinned_files = file_hashes(plain.data_dir), file_hashes(twinned.data_dir)
  extra = sorted(set(twinned_files) - set(plain_files))
  assert extra == [f'sklearn_digits-train.array_record-0000{i}-of-0000{SHARDS}'
                   for i in range(SHARDS)]
  # Every other file, dataset_info.json included, is what tfds alone writes.
  assert {k: v for k, v in twinned_files.items() if k not in extra} == plain_files
  for shard in train_shards(twinned):
    reader = array_record_module.ArrayRecordReader(
        os.path.join(twinned.data_dir, random_access.twin_name(shard)))
    assert list(reader.read_all()) == tfrecords([shard])


def test_training_reads_the_twins_beside_the_shards_and_copies_nothing(twinned, reference,
                                                                       tmp_path):
  copies = str(tmp_path / 'copies')
  assert random_access.location(twinned, 'train', copies) == twinned.data_dir
  assert all_records(random_access.source(twinned, 'train', copies)) == reference
  assert not os.path.exists(copies)


# ---------------------------------------------------------------------------------------------
# The copy: once, outside the dataset, whole files only.


def test_a_dataset_without_twins_is_copied_once_outside_its_directory(plain, reference,
                                                                      tmp_path):
  copies = str(tmp_path / 'copies')
  before = file_hashes(plain.data_dir)
  source = random_access.source(plain, 'train', copies)
  assert all_records(source) == reference
  where = random_access.copy_dir(plain, copies)
  assert where.startswith(copies) and len(twins_in(where)) == SHARDS
  written = twins_in(where)
  assert all_records(random_access.source(plain, 'train', copies)) == reference
  assert twins_in(where) == written  # Found whole: not written again.
  assert file_hashes(plain.data_dir) == before
  assert not [n for n in os.listdir(where) if random_access.TEMPORARY in n]


def test_only_the_split_training_reads_is_copied_and_a_slice_reads_its_part(plain, reference,
                                                                            tmp_path):
  copies = str(tmp_path / 'copies')
  source = random_access.source(plain, 'train[100:300]', copies)
  assert all_records(source) == reference[100:300]
  assert sorted(twins_in(random_access.copy_dir(plain, copies))) == [
      random_access.twin_name(s) for s in train_shards(plain)]


def test_a_truncated_copy_is_found_when_opened_and_written_again(plain, reference, tmp_path):
  copies = str(tmp_path / 'copies')
  where = random_access.location(plain, 'train', copies)
  written = twins_in(where)
  short = sorted(written)[1]
  with open(os.path.join(where, short), 'r+b') as f:
    f.truncate(os.path.getsize(f.name) // 2)
  assert all_records(random_access.source(plain, 'train', copies)) == reference
  again = twins_in(where)
  assert again[short] != written[short]
  assert {k: v for k, v in again.items() if k != short} == {
      k: v for k, v in written.items() if k != short}


def test_a_truncated_twin_beside_the_shards_is_left_there_and_a_copy_read(twinned, reference,
                                                                          tmp_path):
  data_dir = str(tmp_path / 'tfds')
  shutil.copytree(twinned.data_dir_root, data_dir)
  builder = tfds.builder('sklearn_digits', data_dir=data_dir)
  twin = os.path.join(builder.data_dir, random_access.twin_name(train_shards(builder)[0]))
  with open(twin, 'r+b') as f:
    f.truncate(1000)
  before = file_hashes(data_dir)
  copies = str(tmp_path / 'copies')
  assert random_access.location(builder, 'train', copies) == random_access.copy_dir(
      builder, copies)
  assert all_records(random_access.source(builder, 'train', copies)) == reference
  assert file_hashes(data_dir) == before


def test_a_copy_directory_that_cannot_be_written_is_a_config_error_naming_the_field(plain,
                                                                                    tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  with pytest.raises(errors.ConfigError,
                     match=r"config.random_access_dir='.*file/copies': cannot write"):
    random_access.source(plain, 'train', str(blocker / 'copies'))


def test_a_copy_directory_on_gs_is_refused_before_anything_runs(digits_config):
  config = digits_config.copy_and_resolve_references()
  config.random_access_dir = 'gs://bucket/copies'
  with pytest.raises(errors.ConfigError, match=r"config.random_access_dir='gs://bucket/copies'"
                     r".*local files only"):
    config_validation.validate(config, 8)


# ---------------------------------------------------------------------------------------------
# Several processes, and a process killed mid-copy.

# Runs `random_access.source` on sklearn_digits in DATA_DIR with copies in COPIES once START
# exists, each shard's copy slowed (STALL_AT: the shard whose copy hangs after its first records,
# waiting to be killed), and prints which files it wrote and a digest of what it read.
WORKER = r'''
import hashlib, os, sys, time
from absl import logging
import tensorflow_datasets as tfds
from vgg_jax.datasets import random_access

data_dir, copies, start, stall_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
logging.set_verbosity(logging.INFO)
copy_shard, records = random_access._copy_shard, random_access._records

def slow_copy_shard(shard, target, num_records):
  print('WROTE', os.path.basename(target), flush=True)
  time.sleep(1)  # Long enough for the other process to find the lock taken.
  copy_shard(shard, target, num_records)

def stalling_records(shard):
  for batch in records(shard):
    yield batch[:100]
    if shard.endswith(f'0000{stall_at}-of-00003'):
      print('STALLED', flush=True)
      time.sleep(600)
    yield batch[100:]

random_access._copy_shard, random_access._records = slow_copy_shard, stalling_records
builder = tfds.builder('sklearn_digits', data_dir=data_dir)
print('READY', flush=True)
while not os.path.exists(start):
  time.sleep(0.01)
source = random_access.source(builder, 'train', copies)
read = source.__getitems__(list(range(len(source))))
print('DIGEST', hashlib.sha256(b''.join(read)).hexdigest(), flush=True)
'''


def start_worker(data_dir, copies, start, stall_at=-1) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-c', WORKER, data_dir, copies, start, str(stall_at)],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(process: subprocess.Popen, word: str) -> None:
  for line in process.stdout:
    if line.startswith(word):
      return
  pytest.fail(f'the worker ended before printing {word}: {process.stderr.read()[-3000:]}')


def test_two_processes_sharing_a_copy_directory_write_each_file_once_and_read_the_same(
    plain, reference, tmp_path):
  copies, start = str(tmp_path / 'copies'), str(tmp_path / 'start')
  workers = [start_worker(plain.data_dir_root, copies, start) for _ in range(2)]
  for worker in workers:
    wait_for_line(worker, 'READY')
  open(start, 'w').close()
  outputs = [worker.communicate(timeout=300) for worker in workers]
  for worker, (_, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-3000:]
  wrote = [line.split()[1] for out, _ in outputs for line in out.splitlines()
           if line.startswith('WROTE')]
  assert sorted(wrote) == [random_access.twin_name(s) for s in train_shards(plain)]
  digests = {line.split()[1] for out, _ in outputs for line in out.splitlines()
             if line.startswith('DIGEST')}
  assert digests == {hashlib.sha256(b''.join(reference)).hexdigest()}
  assert sum('Waiting for' in stderr for _, stderr in outputs) == 1


def test_a_copy_killed_mid_way_resumes_at_its_first_unfinished_file(plain, reference, tmp_path,
                                                                   absl_info):
  copies, start = str(tmp_path / 'copies'), str(tmp_path / 'start')
  open(start, 'w').close()
  worker = start_worker(plain.data_dir_root, copies, start, stall_at=1)
  wait_for_line(worker, 'STALLED')
  where = random_access.copy_dir(plain, copies)
  first = twins_in(where)
  temporaries = [n for n in os.listdir(where) if random_access.TEMPORARY in n]
  assert list(first) == [random_access.twin_name(train_shards(plain)[0])]
  assert len(temporaries) == 1
  worker.send_signal(signal.SIGKILL)
  worker.communicate()

  assert all_records(random_access.source(plain, 'train', copies)) == reference
  after = twins_in(where)
  assert len(after) == SHARDS and {k: after[k] for k in first} == first
  assert not [n for n in os.listdir(where) if random_access.TEMPORARY in n]
  assert any(f'Removing {os.path.join(where, temporaries[0])}' in m for m in absl_info)
  assert any(f'Copying 2 of the {SHARDS} TFRecord shards' in m for m in absl_info)


# ---------------------------------------------------------------------------------------------
# The command that writes the copy before a run, and training where the data really lives.


def test_prepare_command_writes_the_copy_and_prints_where(plain, reference, tmp_path):
  copies = str(tmp_path / 'copies')
  result = subprocess.run(
      [sys.executable, '-m', 'vgg_jax.prepare', '--config=experiments/digits.py',
       f'--config.data_dir={plain.data_dir_root}', f'--config.random_access_dir={copies}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  where = result.stdout.strip().splitlines()[-1]
  assert where == random_access.copy_dir(plain, copies) and len(twins_in(where)) == SHARDS
  assert 'read by index from 3 ArrayRecord files' in result.stderr
  assert all_records(random_access.source(plain, 'train', copies)) == reference


TINY = ('--config=experiments/digits.py', '--config.variant=A', '--config.width=0.0625',
        '--config.batch_size=128', '--config.log_every_steps=1',
        '--config.checkpoint_every_steps=100')


def can_mount_read_only(tmp_path) -> str:
  """'' if this process may bind-mount a directory read-only in a new mount namespace (root
  with unshare, as in CI), else why not."""
  if os.geteuid() != 0 or not shutil.which('unshare'):
    return 'needs root and unshare for a read-only bind mount'
  probe = tmp_path / 'probe'
  probe.mkdir()
  result = subprocess.run(['unshare', '-m', 'sh', '-c', read_only(str(probe), 'true')],
                          capture_output=True, text=True, check=False)
  return '' if result.returncode == 0 else f'unshare -m failed: {result.stderr.strip()}'


def read_only(directory: str, command: str) -> str:
  """A shell line running `command` with `directory` mounted read-only (in its namespace)."""
  return (f'mount --bind {directory} {directory} && '
          f'mount -o remount,ro,bind {directory} {directory} && {command}')


@pytest.mark.slow
def test_training_on_a_read_only_data_dir_trains_resumes_and_leaves_it_unchanged(
    plain, tmp_path):
  why_not = can_mount_read_only(tmp_path)
  if why_not:
    pytest.skip(why_not)
  data_dir = str(tmp_path / 'tfds')
  shutil.copytree(plain.data_dir_root, data_dir)
  before = file_hashes(data_dir)
  workdir, copies = tmp_path / 'run', tmp_path / 'copies'

  def train(steps):
    main = ' '.join([sys.executable, '-m', 'vgg_jax.main', *TINY, f'--workdir={workdir}',
                     f'--config.data_dir={data_dir}', f'--config.random_access_dir={copies}',
                     f'--config.num_train_steps={steps}', f'--config.eval_every_steps={steps}'])
    probe = f'! touch {data_dir}/probe 2>/dev/null'  # The mount is read-only indeed.
    command = ['unshare', '-m', 'sh', '-c', read_only(data_dir, f'{probe} && {main}')]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return result

  train(2)
  resumed = train(4)
  assert 'Resumed from' in resumed.stderr and 'at step 2' in resumed.stderr
  assert json.loads((workdir / 'eval_metrics.json').read_text())['step'] == 4
  assert file_hashes(data_dir) == before
  builder = tfds.builder('sklearn_digits', data_dir=data_dir)
  assert len(twins_in(random_access.copy_dir(builder, str(copies)))) == SHARDS


# TensorFlow's in-memory file system, ram://, is like gs:// for this: tf.io.gfile reads and
# writes it, ArrayRecord and Python's open() do neither. tfds reaches files through etils' epath,
# which routes gs:// to tf.io.gfile; the script routes ram:// there too, copies a prepared
# dataset into it, and trains from it in the same process (ram:// lives in the process).
RAM_TRAINING = r'''
import json, os, sys
from etils.epath import backend, gpath, register
gpath._URI_PREFIXES += ('ram://',)
gpath._URI_SCHEMES = gpath._URI_SCHEMES | {'ram'}
gpath._URI_MAP_ROOT['ram://'] = '/ram/'
gpath._PREFIX_TO_BACKEND['ram'] = backend.tf_backend
register._URI_PREFIXES_TO_CLS['ram://'] = gpath.PosixGPath
import tensorflow as tf
from experiments import digits
from vgg_jax import train

local, workdir, copies = sys.argv[1:]
for root, _, files in os.walk(local):
  for name in files:
    target = 'ram://tfds/' + os.path.relpath(os.path.join(root, name), local)
    tf.io.gfile.makedirs(os.path.dirname(target))
    tf.io.gfile.copy(os.path.join(root, name), target)
config = digits.get_config()
config.update(data_dir='ram://tfds', random_access_dir=copies, variant='A', width=0.0625,
              batch_size=128, num_train_steps=2, eval_every_steps=2, log_every_steps=1)
print(json.dumps(train.train_and_evaluate(config, workdir)))
'''


@pytest.mark.slow
def test_training_from_a_data_dir_arrayrecord_cannot_open_copies_the_train_split(twinned,
                                                                                 tmp_path):
  """Twins on such storage are of no use to ArrayRecord: the train split is copied."""
  copies = str(tmp_path / 'copies')
  result = subprocess.run([sys.executable, '-c', RAM_TRAINING, twinned.data_dir_root,
                           str(tmp_path / 'run'), copies],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  metrics = json.loads(result.stdout.strip().splitlines()[-1])
  assert metrics['step'] == 2 and metrics['num_examples'] == 360
  copied = [os.path.join(root, name) for root, _, files in os.walk(copies) for name in files
            if '.array_record-' in name]
  assert sorted(map(os.path.basename, copied)) == [
      random_access.twin_name(s) for s in train_shards(twinned)]


def test_a_dataset_stored_as_array_record_alone_is_refused_naming_the_format(digits_config,
                                                                             tmp_path):
  """tfds cannot stream ArrayRecord for evaluation: say so before training, not after."""
  config = digits_config.copy_and_resolve_references()
  config.data_dir = str(tmp_path / 'tfds')
  tfds.builder('sklearn_digits', data_dir=config.data_dir).download_and_prepare(
      file_format='array_record')
  with pytest.raises(errors.ConfigError, match=r'config.data_dir=.*stored there as array_record'):
    input_pipeline.get_builder(config)
