"""Prepares a run's data before the run: `python -m vgg_jax.prepare --config=FILE [--config.*]`.

Does what a training run does before its first step, and nothing else: prepares the tfds
dataset if it is not (ImageNet from config.manual_dir), then makes sure the train split can be
read by index, writing its ArrayRecord copy into config.random_access_dir if the dataset lacks
ArrayRecord twins beside its shards (`datasets.random_access`). Run it once, with the flags of
the training command, where the copy will live: on one host for a directory all hosts mount,
on every host (`--worker=all`) for a per-host directory, so a pod's first step is not spent
copying. Rerunning it is cheap: what is done is checked, not redone.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vgg_jax import cli
from vgg_jax import config_validation
from vgg_jax import errors
from vgg_jax import input_pipeline
from vgg_jax.datasets import random_access

FLAGS = flags.FLAGS


def prepare(config) -> str:
  """Prepares `config`'s dataset and the random access to its train split; returns the
  directory training will read the train split from."""
  config_validation.check_random_access_dir(config)
  builder = input_pipeline.get_builder(config)
  split = config.train_split
  where = random_access.location(builder, split, config.random_access_dir)
  files = [os.path.join(where, random_access.twin_name(shard))
           for name in random_access.split_names(split)
           for shard in builder.info.splits[name].filenames]
  logging.info('%s %r: read by index from %d ArrayRecord files in %s (%.3g GB).', builder.name,
               split, len(files), where, sum(map(os.path.getsize, files)) / 1e9)
  return where


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  cli.setup()
  try:
    print(prepare(FLAGS.config))
  except errors.ConfigError as e:
    sys.exit(f'vgg_jax.prepare: {e}')


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Experiment config file, as for vgg_jax.main.',
                                  lock_config=True)
  flags.mark_flags_as_required(['config'])
  cli.run(main)
