"""Orbax checkpoints of the training state, with the experiment config beside them.

A checkpoint holds the step, parameters, optimiser state and learning-rate plateau state; the
data position needs nothing more, since the input stream is a function of the step
(`input_pipeline.train_dataset`). The config is stored as JSON so a checkpoint says what it is.
Nothing is pickled.
"""

import os
from typing import Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

from vgg_jax import steps


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def create_manager(workdir: str, config) -> ocp.CheckpointManager:
  """Saves asynchronously into WORKDIR/checkpoints, keeping the newest `keep_checkpoints`."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'config'))


def _saved_fields(state: steps.TrainState) -> dict:
  return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state,
          'plateau': state.plateau}


def save(manager: ocp.CheckpointManager, state: steps.TrainState, config) -> None:
  """Starts an asynchronous save of `state` at its step (returns once the arrays are copied)."""
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_saved_fields(state)),
      config=ocp.args.JsonSave(config.to_dict())))


def _replicated(tree):
  sharding = steps.replicated_sharding()
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
  return state.replace(**restored)


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
  for field in ('mean_rgb', 'test_scales'):
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
  return restored['params']
