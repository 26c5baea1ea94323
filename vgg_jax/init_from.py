"""Where a run's first parameters come from, decided once, before anything compiles.

In order: the workdir's own newest checkpoint (resume; `check_resume` refuses one whose net
or optimiser does not fit this config); else `config.init_from`, another run's checkpoint,
copied in by `config.init_mode` (`MODES`: deeper nets from net A, Sec. 3.1; the same net
continued; fine-tuning for new classes); else a fresh initialisation (`models.VGG`).
"""

import dataclasses
from typing import Callable, Optional

from absl import logging
import ml_collections

from vgg_jax import checkpoints
from vgg_jax import errors
from vgg_jax import preprocess
from vgg_jax import run_files

# Config fields that fix the parameter shapes: a checkpoint only fits a net that agrees on all.
SHAPE_FIELDS = ('variant', 'width', 'num_classes', 'image_size')
# Fields that fix the optimiser state's structure: a run resumes only with the same values.
OPTIMIZER_FIELDS = ('frozen_layers', 'sgd_form')
# Fields that fix the training order (`input_pipeline.train_dataset`): a resumed run with
# other values would repeat or skip examples of the interrupted epoch.
DATA_ORDER_FIELDS = ('batch_size', 'seed', 'train_split')

# Sec. 3.1: "we initialised the first four convolutional layers and the last three fully-
# connected layers with the layers of net A". By name these have the same shapes in every net.
NET_A_LAYERS = ('conv1_1', 'conv2_1', 'conv3_1', 'conv3_2', 'fc6', 'fc7', 'fc8')


@dataclasses.dataclass(frozen=True)
class Mode:
  """How `config.init_from` seeds a run.

  Attributes:
    sources: the variants the source net may be; None: any.
    same: config fields the source must share with this run.
    layers: the layers copied, given this net's layer names.
    why: what the mode is for, for error messages.
  """
  sources: Optional[tuple[str, ...]]
  same: tuple[str, ...]
  layers: Callable[[tuple[str, ...]], tuple[str, ...]]
  why: str


MODES = {
    'net_a': Mode(('A', 'A-LRN'), ('width', 'num_classes', 'image_size'),
                  lambda names: NET_A_LAYERS, 'seeds from net A (Sec. 3.1)'),
    'all': Mode(None, SHAPE_FIELDS, lambda names: names,
                'continues the same net (the S = 384 net from S = 256, jittered S from 384)'),
    'finetune': Mode(None, ('variant', 'width', 'image_size'),
                     lambda names: tuple(n for n in names if n != 'fc8'),
                     'keeps every layer but fc8, fresh for this run\'s classes'),
}


def check_resume(workdir: str, config) -> bool:
  """Whether WORKDIR holds a checkpoint to resume; a ConfigError, before anything is built,
  when that checkpoint's net or optimiser state does not fit `config`."""
  if run_files.is_conversion(workdir):
    raise errors.ConfigError(
        f'--workdir={workdir!r} holds imported weights (vgg_jax.convert), not a training run; '
        f'train in a new workdir with --config.init_from={workdir}.')
  found = checkpoints.saved_config(workdir)
  if found is None:
    return False
  step, saved = found
  for field in SHAPE_FIELDS + OPTIMIZER_FIELDS:
    if saved[field] != config[field]:
      raise errors.ConfigError(
          f'config.{field}={config[field]!r}: {checkpoints.checkpoint_dir(workdir)} holds a '
          f'checkpoint (step {step}) of a net with {field}={saved[field]!r}, whose '
          f'{"parameters" if field in SHAPE_FIELDS else "optimiser state"} does not fit. '
          f'Resume with {field}={saved[field]!r}, or start in a new workdir (with '
          'config.init_from to reuse the weights).')
  changed = [f for f in DATA_ORDER_FIELDS if saved[f] != config[f]]
  for field in changed:
    if not config.allow_data_order_change:
      raise errors.ConfigError(
          f'config.{field}={config[field]!r}: {checkpoints.checkpoint_dir(workdir)} holds a '
          f'checkpoint (step {step}) trained with {field}={saved[field]!r}, and another value '
          f'changes which examples the rest of the epoch reads. Resume with {field}='
          f'{saved[field]!r}, or pass --config.allow_data_order_change=True to take the new '
          'order from here on.')
    logging.warning('Resuming step %d with %s=%r instead of %r (allow_data_order_change): '
                    'the training order changes from here on.', step, field, config[field],
                    saved[field])
  return True


def check_init_from(config) -> None:
  """A ConfigError, before anything is built, unless config.init_from holds a checkpoint that
  can seed this net by config.init_mode."""
  source_dir, name = config.init_from, config.init_mode
  mode = MODES[name]
  field = f'config.init_from={source_dir!r}'
  try:
    source = checkpoints.load_config(source_dir)
  except FileNotFoundError as e:
    raise errors.ConfigError(f'{field}: no checkpoint in '
                             f'{checkpoints.checkpoint_dir(source_dir)}; train that net '
                             'first.') from e
  if mode.sources and source.variant not in mode.sources:
    raise errors.ConfigError(
        f'{field}: holds net {source.variant}, but init_mode={name} {mode.why}; point '
        f'init_from at a net-{mode.sources[0]} run, or use init_mode=all to continue the same '
        'net (finetune for other classes).')
  for same in mode.same:
    if source[same] != config[same]:
      raise errors.ConfigError(
          f'{field}: holds a net with {same}={source[same]!r}, this run has '
          f'{same}={config[same]!r}; init_mode={name} needs them equal.')


def with_source_normalization(config):
  """`config` with the input normalisation of config.init_from's net (mean_rgb, std_rgb,
  channel_order): its weights were trained on those inputs, whatever this run's defaults say.
  A copy; `config` itself if there is no init_from or nothing differs."""
  if not config.init_from:
    return config
  try:
    source = checkpoints.load_config(config.init_from)
  except FileNotFoundError:
    return config  # check_init_from says what is wrong.
  theirs = preprocess.Normalization.from_config(source)
  if preprocess.Normalization.from_config(config) == theirs:
    return config
  logging.info('Input normalisation of %s adopted, as its weights expect: %s.',
               config.init_from, theirs)
  config = ml_collections.ConfigDict(config.to_dict())
  config.update(dataclasses.asdict(theirs))
  return config


def transplant(target: dict, source: dict, layers) -> dict:
  """`target` with `layers` replaced by `source`'s, every shape checked first."""
  for layer in layers:
    if layer not in source:
      raise ValueError(f'The source checkpoint has no layer {layer}; it has '
                       f'{", ".join(source)}.')
    for name in sorted(target[layer], key=lambda n: n != 'kernel'):
      have = getattr(source[layer].get(name), 'shape', None)
      if have != target[layer][name].shape:
        raise ValueError(f'{layer}/{name}: the source checkpoint holds shape {have}, this net '
                         f'needs {target[layer][name].shape}; seed from a net of matching '
                         'width, image size and classes.')
  return {layer: source[layer] if layer in layers else value for layer, value in target.items()}


def seed_params(params: dict, config) -> dict:
  """`params` with the layers of config.init_mode copied from config.init_from's newest
  checkpoint; the others keep their fresh initialisation."""
  check_init_from(config)
  source_dir = config.init_from
  source_config = checkpoints.load_config(source_dir)
  source = checkpoints.restore_params(source_dir, source_config)
  layers = MODES[config.init_mode].layers(tuple(params))
  params = transplant(params, source, layers)
  logging.info('Seeded from %s (net %s, step %d): %s copied; %s initialised afresh.',
               source_dir, source_config.variant, checkpoints.latest_step(source_dir),
               ', '.join(layers), ', '.join(l for l in params if l not in layers) or 'nothing')
  return params
