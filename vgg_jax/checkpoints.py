"""Orbax checkpoints of the training state, with the experiment config beside them.

A checkpoint holds the step, parameters, optimiser state and learning-rate plateau state; the
data position needs nothing more, since the input stream is a function of the step
(`input_pipeline.train_dataset`). The config is stored as JSON so a checkpoint says what it is.
Nothing is pickled.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed at any moment leaves the previous checkpoints whole; a partial one is never
restored, and is removed when the next run starts.
"""

import dataclasses
import json
import os
from typing import Optional, Sequence

from absl import logging
from etils import epath

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vgg_jax import config_validation
from vgg_jax import preprocess
from vgg_jax import steps

# Config fields that fix the parameter shapes: a checkpoint only fits a net that agrees on all.
SHAPE_FIELDS = ('variant', 'width', 'num_classes', 'image_size')
# Fields that fix the optimiser state's structure: a run resumes only with the same values.
OPTIMIZER_FIELDS = ('frozen_layers', 'sgd_form')
# What a checkpoint whose config predates a field was written with.
BEFORE_THE_FIELD = {'sgd_form': 'pytorch'}
# Beside the checkpoints: the class names, in label order; and, in a directory of imported
# weights (vgg_jax.convert), where they came from.
CLASS_NAMES = 'classes.json'
SOURCE_RECORD = 'source.json'


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed (disk full, no permission); the earlier ones are intact."""


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, absolute (Orbax needs it); gs:// and other URLs as they are."""
  return os.path.join(workdir if '://' in workdir else os.path.abspath(workdir), 'checkpoints')


def create_manager(workdir: str, config) -> ocp.CheckpointManager:
  """Saves asynchronously into WORKDIR/checkpoints, keeping the newest `keep_checkpoints`."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'config'))


def _saved_fields(state: steps.TrainState) -> dict:
  return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state,
          'plateau': state.plateau, 'nonfinite_steps': state.nonfinite_steps}


def save(manager: ocp.CheckpointManager, state: steps.TrainState, config) -> None:
  """Starts an asynchronous save of `state` at its step (returns once the arrays are copied)."""
  step = int(jax.device_get(state.step))
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_global(_saved_fields(state))),
        config=ocp.args.JsonSave(config.to_dict())))
  except Exception as e:  # Also where the previous save's asynchronous error surfaces.
    raise _write_error(manager, e) from e


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
  """Blocks until the asynchronous save under way is on disk; CheckpointWriteError if it failed."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise _write_error(manager, e) from e


def _write_error(manager: ocp.CheckpointManager, error: Exception) -> CheckpointWriteError:
  on_disk = ocp.CheckpointManager(manager.directory, item_names=('state', 'config')).latest_step()
  kept = (f'the newest complete checkpoint, of step {on_disk}, is intact'
          if on_disk is not None else 'no complete checkpoint was written before')
  return CheckpointWriteError(
      f'Writing a checkpoint to {manager.directory} failed ({type(error).__name__}: {error}); '
      f'{kept}. Free space or fix permissions there, then rerun the same command to resume.')


def _global_mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.asarray(jax.devices()), (steps.AXIS,))


def _to_global(tree):
  """The pmapped steps keep one copy of the state per process (on its local devices); Orbax
  saves and restores global arrays, each written once, so every process takes part in a
  multi-host checkpoint with nothing duplicated."""
  return multihost_utils.host_local_array_to_global_array(
      tree, _global_mesh(), jax.sharding.PartitionSpec())


def _to_local(tree):
  """Back to the steps' layout: replicated on this process's devices."""
  tree = multihost_utils.global_array_to_host_local_array(
      tree, _global_mesh(), jax.sharding.PartitionSpec())
  return jax.device_put(tree, steps.replicated_sharding())


def _replicated(tree):
  """Restore targets: global arrays replicated over every device of every process."""
  sharding = jax.sharding.NamedSharding(_global_mesh(), jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore_latest(manager: ocp.CheckpointManager,
                   state: steps.TrainState) -> Optional[steps.TrainState]:
  """The newest checkpoint restored into `state`'s structure, replicated on the local devices;
  None when the workdir has none."""
  step = manager.latest_step()
  if step is None:
    return None
  target = _replicated(_saved_fields(state))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))['state']
  return state.replace(**_to_local(restored))


def check_resume(workdir: str, config) -> bool:
  """Whether WORKDIR holds a checkpoint to resume; a ConfigError, before anything is built,
  when that checkpoint's net has other parameter shapes than `config`'s."""
  if not epath.Path(checkpoint_dir(workdir)).is_dir():
    return False
  if (epath.Path(workdir) / SOURCE_RECORD).exists():
    raise config_validation.ConfigError(
        f'--workdir={workdir!r} holds imported weights (vgg_jax.convert), not a training run; '
        f'train in a new workdir with --config.init_from={workdir}.')
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=('state', 'config'))
  step = manager.latest_step()
  if step is None:
    return False
  saved = restore_config(manager, step)
  for field in SHAPE_FIELDS + OPTIMIZER_FIELDS:
    saved.setdefault(field, BEFORE_THE_FIELD.get(field, config.get(field)))
    if saved[field] != config.get(field):
      raise config_validation.ConfigError(
          f'config.{field}={config[field]!r}: {checkpoint_dir(workdir)} holds a checkpoint '
          f'(step {step}) of a net with {field}={saved.get(field)!r}, whose '
          f'{"parameters" if field in SHAPE_FIELDS else "optimiser state"} does not fit. '
          f'Resume with {field}={saved.get(field)!r}, or start in a new workdir (with '
          'config.init_from to reuse the weights).')
  return True


def check_init_from(config) -> None:
  """A ConfigError, before anything is built, unless config.init_from holds a checkpoint that
  can seed this net: net A (or A-LRN) for init_mode 'net_a', this very net for 'all', this net
  with any number of classes for 'finetune'."""
  source_dir, mode = config.init_from, config.init_mode
  field = f'config.init_from={source_dir!r}'
  try:
    source = load_config(source_dir)
  except FileNotFoundError as e:
    raise config_validation.ConfigError(f'{field}: no checkpoint in '
                                        f'{checkpoint_dir(source_dir)}; train that net first.') from e
  if mode == 'net_a' and source.variant not in ('A', 'A-LRN'):
    raise config_validation.ConfigError(
        f'{field}: holds net {source.variant}, but init_mode=net_a seeds from net A (Sec. 3.1); '
        'point init_from at a net-A run, or use init_mode=all to continue the same net '
        '(finetune for other classes).')
  names = {'net_a': ('width', 'num_classes', 'image_size'),
           'all': ('variant', 'width', 'num_classes', 'image_size'),
           'finetune': ('variant', 'width', 'image_size')}[mode]
  for name in names:
    if source.get(name) != config[name]:
      raise config_validation.ConfigError(
          f'{field}: holds a net with {name}={source.get(name)!r}, this run has '
          f'{name}={config[name]!r}; init_mode={mode} needs them equal.')


def with_source_normalization(config):
  """`config` with the input normalisation of config.init_from's net (mean_rgb, std_rgb,
  channel_order): its weights were trained on those inputs, whatever this run's defaults say.
  A copy; `config` itself if there is no init_from or nothing differs."""
  if not config.get('init_from'):
    return config
  try:
    source = load_config(config.init_from)
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


def restore_config(manager: ocp.CheckpointManager, step: Optional[int] = None) -> dict:
  """The config a checkpoint was trained with, as a dict."""
  step = manager.latest_step() if step is None else step
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def latest_step(workdir: str) -> int:
  """The newest checkpointed step in WORKDIR; a clear error when there is none."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=('state', 'config'))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'{checkpoint_dir(workdir)} holds no checkpoint: train first with '
                            f'python -m vgg_jax.main --workdir={workdir}.')
  return step


def load_config(workdir: str, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config WORKDIR's checkpoint was trained with (newest step unless `step`)."""
  step = latest_step(workdir) if step is None else step
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=('state', 'config'))
  saved = restore_config(manager, step)
  if isinstance(saved.get('train_scale'), list):
    saved['train_scale'] = tuple(saved['train_scale'])
  for field in ('mean_rgb', 'std_rgb', 'test_scales'):
    if isinstance(saved.get(field), list):
      saved[field] = tuple(saved[field])
  return ml_collections.ConfigDict(saved)


def restore_params(workdir: str, config, step: Optional[int] = None):
  """Only the parameters of WORKDIR's checkpoint (newest step unless `step`), replicated on
  the local devices: evaluation needs neither the optimiser state nor its memory."""
  step = latest_step(workdir) if step is None else step
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=('state', 'config'))
  model = steps.create_model(config)
  dummy = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jax.numpy.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), dummy)['params']
  target = {'params': _replicated(abstract)}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)))['state']
  return _to_local(restored['params'])


# Sec. 3.1: "we initialised the first four convolutional layers and the last three fully-
# connected layers with the layers of net A". By name these have the same shapes in every net.
NET_A_LAYERS = ('conv1_1', 'conv2_1', 'conv3_1', 'conv3_2', 'fc6', 'fc7', 'fc8')


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
                         f'needs {target[layer][name].shape}; seed from a net of matching width, image size '
                         'and classes.')
  return {layer: source[layer] if layer in layers else value for layer, value in target.items()}


def seed_params(params: dict, config) -> dict:
  """`params` with layers copied from the newest checkpoint of config.init_from.

  init_mode 'net_a': the NET_A_LAYERS (deeper nets from net A); 'all': every layer, and the
  source must be the same net (the S = 384 net from S = 256, jittered S from S = 384);
  'finetune': every layer but fc8, which keeps its fresh initialisation for this run's classes
  (transfer learning).
  """
  source_dir, mode = config.init_from, config.init_mode
  check_init_from(config)
  source_config = load_config(source_dir)
  source = restore_params(source_dir, source_config)
  layers = {'net_a': NET_A_LAYERS, 'all': tuple(params),
            'finetune': tuple(l for l in params if l != 'fc8')}[mode]
  params = transplant(params, source, layers)
  logging.info('Seeded from %s (net %s, step %d): %s copied; %s initialised afresh.',
               source_dir, source_config.variant, latest_step(source_dir), ', '.join(layers),
               ', '.join(l for l in params if l not in layers) or 'nothing')
  return params


def save_params(workdir: str, params, config) -> None:
  """A parameters-only checkpoint (step 0) and its config in WORKDIR, as evaluation and
  init_from read them: imported weights (vgg_jax.convert)."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=('state', 'config'),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({'params': params}),
                                          config=ocp.args.JsonSave(config.to_dict())))
  manager.wait_until_finished()
  manager.close()


def write_class_names(workdir: str, names: Sequence[str]) -> None:
  """WORKDIR/classes.json: the class names in label order, for predictions (process 0)."""
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / CLASS_NAMES).write_text(json.dumps(list(names), indent=0))


def class_names(workdir: str) -> Optional[list[str]]:
  """The class names of WORKDIR's net in label order; None if it has none recorded."""
  path = epath.Path(workdir) / CLASS_NAMES
  return json.loads(path.read_text()) if path.exists() else None
