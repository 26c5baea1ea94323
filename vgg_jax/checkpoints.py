"""Orbax checkpoints of the training state, with the experiment config beside them.

A checkpoint holds the step, parameters, optimiser state and learning-rate plateau state; the
data position needs nothing more, since the input stream is a function of the step
(`input_pipeline.train_dataset`). The config is stored as JSON so a checkpoint says what it is.
Nothing is pickled.
"""

import os
from typing import Optional

import jax
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
