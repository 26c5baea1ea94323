"""Orbax checkpoints of the training state, with the experiment config beside them.

A checkpoint holds the step, parameters, optimiser state and learning-rate plateau state; the
data position needs nothing more, since the input stream is a function of the step
(`input_pipeline.train_dataset`). The config is stored as JSON so a checkpoint says what it is.
Nothing is pickled.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed at any moment leaves the previous checkpoints whole; a partial one is never
restored, and is removed when the next run starts.

The pmapped steps keep one full copy of the state on every local device; Orbax saves global
arrays, each written once. `_to_global` and `_to_local` convert between the two, so every
process of a multi-host run takes part in a checkpoint with nothing duplicated.
"""

import contextlib
import os
from typing import Any, Optional

from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vgg_jax import default_config
from vgg_jax import models

ITEMS = ('state', 'config')
# Beside the checkpoints: the class names, in label order; and, in a directory of imported
# weights (vgg_jax.convert), where they came from.
# The state's fields a checkpoint holds (`TrainState`'s, less the functions).
SAVED_FIELDS = ('step', 'params', 'opt_state', 'plateau', 'nonfinite_steps')


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed (disk full, no permission); the earlier ones are intact."""


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, absolute (Orbax needs it); gs:// and other URLs as they are."""
  return os.path.join(workdir if '://' in workdir else os.path.abspath(workdir), 'checkpoints')


def _manager(directory: str, **options) -> ocp.CheckpointManager:
  """The one way this module opens a checkpoint directory; reading, it creates nothing."""
  return ocp.CheckpointManager(directory, item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(**options))


def create_manager(workdir: str, config) -> ocp.CheckpointManager:
  """Saves asynchronously into WORKDIR/checkpoints, keeping the newest `keep_checkpoints`.
  `close` it when done."""
  return _manager(checkpoint_dir(workdir), max_to_keep=config.keep_checkpoints, create=True,
                  cleanup_tmp_directories=True)


def close(manager: ocp.CheckpointManager) -> None:
  """Closes `manager` once a run is done with it. A save that failed has been reported by
  `wait_until_finished`, or is secondary to whatever stopped the run, so it is not raised
  again here."""
  with contextlib.suppress(Exception):
    manager.close()


def _saved(state) -> dict:
  return {field: getattr(state, field) for field in SAVED_FIELDS}


def save(manager: ocp.CheckpointManager, state, config) -> None:
  """Starts an asynchronous save of `state` at its step (returns once the arrays are copied)."""
  step = int(jax.device_get(state.step))
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_global(_saved(state))),
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
  with _manager(manager.directory) as reader:
    on_disk = reader.latest_step()
  kept = (f'the newest complete checkpoint, of step {on_disk}, is intact'
          if on_disk is not None else 'no complete checkpoint was written before')
  return CheckpointWriteError(
      f'Writing a checkpoint to {manager.directory} failed ({type(error).__name__}: {error}); '
      f'{kept}. Free space or fix permissions there, then rerun the same command to resume.')


def _global_mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.asarray(jax.devices()), ('replica',))


def _to_global(tree):
  return jax.tree.map(ocp.utils.fully_replicated_host_local_array_to_global_array, tree)


def _to_local(tree):
  """Global arrays replicated on every device -> the same, on this process's devices."""
  return multihost_utils.global_array_to_host_local_array(
      tree, _global_mesh(), jax.sharding.PartitionSpec())


def _replicated(tree):
  """Restore targets: global arrays replicated over every device of every process."""
  sharding = jax.sharding.NamedSharding(_global_mesh(), jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore_latest(manager: ocp.CheckpointManager, state) -> Optional[Any]:
  """The newest checkpoint restored into `state` (a `steps.TrainState`), each array placed
  as `state`'s is; None when the workdir has none."""
  step = manager.latest_step()
  if step is None:
    return None
  fields = _saved(state)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_replicated(fields))))['state']
  placed = jax.device_put(_to_local(restored), jax.tree.map(lambda x: x.sharding, fields))
  return state.replace(**placed)


def restore_config(manager: ocp.CheckpointManager, step: Optional[int] = None) -> dict:
  """The config a checkpoint was trained with, as a dict."""
  step = manager.latest_step() if step is None else step
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def saved_config(workdir: str) -> Optional[tuple[int, ml_collections.ConfigDict]]:
  """(step, config) of WORKDIR's newest checkpoint, as `load_config` reads it; None if it
  has none."""
  if not epath.Path(checkpoint_dir(workdir)).is_dir():
    return None
  with _manager(checkpoint_dir(workdir)) as manager:
    step = manager.latest_step()
    if step is None:
      return None
    return step, default_config.from_saved(restore_config(manager, step))


def latest_step(workdir: str) -> int:
  """The newest checkpointed step in WORKDIR; a clear error when there is none."""
  with _manager(checkpoint_dir(workdir)) as manager:
    step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'{checkpoint_dir(workdir)} holds no checkpoint: train first with '
                            f'python -m vgg_jax.main --workdir={workdir}.')
  return step


def load_config(workdir: str, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config WORKDIR's checkpoint was trained with (newest step unless `step`), over
  today's defaults (`default_config.from_saved`): every field is there, whatever its age."""
  step = latest_step(workdir) if step is None else step
  with _manager(checkpoint_dir(workdir)) as manager:
    return default_config.from_saved(restore_config(manager, step))


def restore_params(workdir: str, config, step: Optional[int] = None):
  """Only the parameters of WORKDIR's checkpoint (newest step unless `step`), replicated on
  the local devices: evaluation needs neither the optimiser state nor its memory."""
  step = latest_step(workdir) if step is None else step
  model = models.create_model(config)
  dummy = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jax.numpy.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), dummy)['params']
  target = {'params': _replicated(abstract)}
  with _manager(checkpoint_dir(workdir)) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))['state']
  return _to_local(restored['params'])


def save_params(workdir: str, params, config) -> None:
  """A parameters-only checkpoint (step 0) and its config in WORKDIR, as evaluation and
  init_from read them: imported weights (vgg_jax.convert)."""
  with _manager(checkpoint_dir(workdir), create=True) as manager:
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({'params': params}),
                                            config=ocp.args.JsonSave(config.to_dict())))
    manager.wait_until_finished()
