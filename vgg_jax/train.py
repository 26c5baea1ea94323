"""The training loop: config -> input pipeline -> pmapped steps -> checkpoints and metrics.

Resumes from the newest checkpoint in the workdir; evaluates on the held-out split every
`eval_every_steps` (default: each epoch), feeding the validation error to the learning-rate
plateau rule of Sec. 3.1; writes TensorBoard summaries and, at the end,
WORKDIR/eval_metrics.json.

Runs last days on preemptible machines, so: every check that can fail on the config, the
workdir or the dataset runs before anything compiles; SIGTERM (the preemption notice) and
Ctrl-C save the current step and return; a non-finite loss or gradient never reaches the
parameters and stops the run before it is checkpointed; a failed checkpoint write stops it
with the previous checkpoint intact.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import threading
from typing import Any

from absl import logging
from clu import metric_writers
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from vgg_jax import checkpoints
from vgg_jax import config_validation
from vgg_jax import errors
from vgg_jax import evaluation
from vgg_jax import init_from
from vgg_jax import input_pipeline
from vgg_jax import progress as progress_lib
from vgg_jax import protocol
from vgg_jax import report
from vgg_jax import run_files
from vgg_jax import steps


class NonFiniteError(RuntimeError):
  """A step's loss or gradients were NaN or infinite (and skip_nonfinite_steps is off)."""


class Preemption:
  """Whether the run has been asked to stop: SIGTERM (the preemption notice of cloud VMs) or,
  in one process, Ctrl-C (SIGINT). Either saves the current step and returns; a second Ctrl-C
  aborts at once (KeyboardInterrupt), leaving the checkpoints already written.

  One process: the handlers set a flag, read between steps. Several processes: JAX's
  preemption service (started by jax.distributed) catches SIGTERM on any of them and agrees on
  a step at which all save together; Ctrl-C keeps Python's default there, as the processes
  could not agree on a step for it.
  """

  NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'Ctrl-C'}

  def __init__(self):
    self.requested_by, self.aborted, self._previous = None, False, {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {signum: signal.signal(signum, self._handle) for signum in self.NAMES}

  def _handle(self, signum, frame):
    del frame
    if self.requested_by is not None and signum == signal.SIGINT:
      self.aborted = True
      raise KeyboardInterrupt
    if self.requested_by is None:
      logging.warning('%s: saving the current step, then stopping%s.', self.NAMES[signum],
                      ' (Ctrl-C again aborts at once)' if signum == signal.SIGINT else '')
    self.requested_by = self.requested_by or self.NAMES[signum]

  def check_aborted(self) -> None:
    """KeyboardInterrupt if a second Ctrl-C came: the handler's own one is lost where it lands
    in code whose exceptions Python ignores (a `__del__`, such as TensorFlow's)."""
    if self.aborted:
      raise KeyboardInterrupt

  def reached(self, step: int) -> bool:
    self.check_aborted()
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested_by is not None

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def is_time(step: int, every: int, last_step: int) -> bool:
  """Whether a periodic action runs at `step`: every `every` steps (never if every <= 0) and
  at the last step."""
  return step == last_step or (every > 0 and step % every == 0)


class TrainMetrics:
  """The train metrics of the steps since the last log, left on the devices until a log
  needs them, and each step's non-finite flag read one step late: by then the next step is
  queued, so the device never waits on the host. A non-finite step stops the run at the
  next step (NonFiniteError), or is logged and counted with config.skip_nonfinite_steps."""

  def __init__(self, skip_nonfinite_steps: bool):
    self._skip = skip_nonfinite_steps
    self._steps, self._checked = [], 0  # [(step, metrics on the devices)]; how many checked.

  def add(self, step: int, metrics: dict, state) -> None:
    """Keeps `step`'s metrics and checks those before it."""
    self._steps.append((step, metrics))
    self._check(len(self._steps) - 1, state)

  def check_all(self, state) -> None:
    """Checks every step kept, the newest included (before a checkpoint is saved)."""
    self._check(len(self._steps), state)

  def _check(self, end: int, state) -> None:
    for step, metrics in self._steps[self._checked:end]:
      if float(metrics['nonfinite']):
        _nonfinite_step(step, jax.device_get(metrics), state, self._skip)
    self._checked = max(self._checked, end)

  def summary(self, state) -> dict:
    """Mean train metrics over the finite steps kept (all of them, if none is), which are
    then dropped; the learning rate is the one in force at the last step, not a mean across
    a drop."""
    self.check_all(state)
    kept = [jax.device_get(metrics) for _, metrics in self._steps]
    self._steps, self._checked = [], 0
    finite = [m for m in kept if not m['nonfinite']] or kept
    summary = {k: float(np.mean([m[k] for m in finite])) for k in finite[0]}
    summary['learning_rate'] = float(kept[-1]['learning_rate'])
    return summary


def _nonfinite_step(step: int, metrics: dict, state, skip: bool) -> None:
  name, value = (('loss', metrics['loss']) if not np.isfinite(metrics['loss'])
                 else ('gradient norm', metrics['grad_norm']))
  if not skip:
    raise NonFiniteError(
        f'step {step}: the {name} is {value}. Its update was not applied and training stopped '
        'before saving it; the checkpoints in the workdir hold only finite steps. Lower '
        'config.learning_rate, check the data, or set config.skip_nonfinite_steps=True to '
        'skip such steps.')
  logging.warning('step %d: the %s is %s; update skipped (%d skipped in this run so far).',
                  step, name, value, int(jax.device_get(state.nonfinite_steps)))


def held_out_metrics(p_eval_step, state, builder, config) -> dict:
  """Loss and top-1/top-5 error over every example of the eval split (exact counts)."""
  ds, _ = input_pipeline.eval_dataset(builder, config)
  totals = None
  for batch in steps.prefetch_to_device(input_pipeline.as_numpy(ds)):
    sums = p_eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = int(totals.pop('num_examples'))
  return {**{name: float(value) / count for name, value in totals.items()},
          'num_examples': count}


def evaluate_protocols(state, builder, config, workdir: str, step: int, writer,
                       final: bool) -> dict:
  """Sec. 3.2's test protocols (config.eval_protocols) on the eval split, during training.

  Results go to TensorBoard as test/PROTOCOL/top{1,5}_error; the final ones also to
  WORKDIR/eval/results.json and results.md, as `python -m vgg_jax.evaluate` writes them.
  """
  protocols = protocol.parse_protocols(config.eval_protocols, name='config.eval_protocols')
  num_examples = evaluation.per_process(builder.info.splits[config.eval_split].num_examples)
  results, _ = evaluation.run(state.params, config, protocols,
                              functools.partial(input_pipeline.test_batch_iterator, builder, config),
                              num_examples)
  writer.write_scalars(step, {f'test/{name}/{metric}': r[metric]
                              for name, r in results.items()
                              for metric in ('top1_error', 'top5_error')})
  if final and jax.process_index() == 0:
    report.write(workdir, report.annotate(results, config, step, config.eval_split),
                 f'Evaluation of {workdir}: {config.dataset}')
  return results


def _create_writer(workdir: str) -> metric_writers.MetricWriter:
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(
      metric_writers.SummaryWriter(os.path.join(workdir, 'tensorboard')))


def plateau_step(state: steps.TrainState, config, step: int, validation_error: float,
                 writer) -> steps.TrainState:
  """Feeds a validation error to the plateau rule (Sec. 3.1) and, when it divides the
  learning rate, says so in the log and in TensorBoard's train/learning_rate at this step."""
  before = float(jax.device_get(state.plateau.scale))
  state = steps.plateau_update(state, config, validation_error)
  after = float(jax.device_get(state.plateau.scale))
  if after < before * (1 - 1e-3):  # At min_scale, float32 rounding can shave the last bit.
    drop = round(math.log(after) / math.log(config.lr_plateau_factor))
    logging.info('step %d: validation error did not improve for %d evaluations; learning rate '
                 '%.3g -> %.3g (drop %d of %d)', step, config.lr_plateau_patience,
                 config.learning_rate * before, config.learning_rate * after, drop,
                 config.lr_max_decreases)
    writer.write_scalars(step, {'train/learning_rate': config.learning_rate * after})
  return state


def check_workdir(workdir: str) -> None:
  """Fails early, and says so, when WORKDIR cannot be created or written."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_probe_{jax.process_index()}'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise errors.ConfigError(
        f'--workdir={workdir!r}: cannot write there ({e.strerror or e}); choose a directory '
        'this job can create and write.') from e


@dataclasses.dataclass(frozen=True)
class Plan:
  """What preflight settled: the config to run (with init_from's normalisation), the data and
  the schedule."""
  config: Any
  builder: Any
  num_steps: int
  eval_every: int


def preflight(config, workdir: str) -> Plan:
  """Every check that can fail on the config, the workdir or the dataset, before anything
  is compiled or written but classes.json: a mistake costs seconds, not a queue slot."""
  if not (workdir or '').strip():
    raise errors.ConfigError(
        f'--workdir={workdir!r}: empty (an unset shell variable?), which would write into the '
        'current directory; name a directory for the run, e.g. --workdir=workdirs/digits.')
  config = init_from.with_source_normalization(config)
  config_validation.validate(config, jax.device_count())
  resuming = init_from.check_resume(workdir, config)
  builder = input_pipeline.get_builder(config)
  dataset_classes = input_pipeline.num_classes(builder)
  if dataset_classes != config.num_classes:
    raise errors.ConfigError(
        f'config.num_classes={config.num_classes}: {config.dataset} has {dataset_classes} '
        f'classes; set --config.num_classes={dataset_classes}.')
  sizes = input_pipeline.train_sizes(builder, config)
  input_pipeline.train_records(builder, config)  # Writes the copy it reads by index, if need be.
  if not resuming and config.init_from:
    init_from.check_init_from(config)
  check_workdir(workdir)
  run_files.write_class_names(workdir, input_pipeline.class_names(builder))
  num_steps = (config.num_train_steps if config.num_train_steps > 0
               else int(config.num_epochs * sizes.steps_per_epoch))
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else sizes.steps_per_epoch
  logging.info('%s on %s: %d steps of %d images (%d per epoch), %d device(s) in %d process(es).',
               config.variant, config.dataset, num_steps, config.batch_size,
               sizes.steps_per_epoch, jax.device_count(), jax.process_count())
  return Plan(config, builder, num_steps, eval_every)


def initial_state(config, manager, init_rng: jax.Array) -> steps.TrainState:
  """The run's first state, from (in this order) the workdir's newest checkpoint, the
  layers config.init_from seeds, or a fresh initialisation."""
  state = steps.create_train_state(config, init_rng, config.image_size)
  restored = checkpoints.restore_latest(manager, state)
  if restored is not None:
    logging.info('Resumed from %s at step %d.', manager.directory, int(restored.step))
    return restored
  if config.init_from:
    params = init_from.seed_params(jax.device_get(state.params), config)
    return steps.create_train_state(config, init_rng, config.image_size, params=params)
  return state


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the final
  held-out metrics, also written to WORKDIR/eval_metrics.json. A run stopped by SIGTERM or
  Ctrl-C returns {'preempted_at_step': step} after checkpointing that step."""
  plan = preflight(config, workdir)
  init_rng, step_rng = jax.random.split(jax.random.key(plan.config.seed))
  manager = checkpoints.create_manager(workdir, plan.config)
  try:
    state = initial_state(plan.config, manager, init_rng)
    return _train(plan, workdir, manager, state, step_rng)
  finally:
    checkpoints.close(manager)


def _train(plan: Plan, workdir: str, manager, state: steps.TrainState,
           step_rng: jax.Array) -> dict:
  """The loop: steps, logs, evaluations, the plateau rule, checkpoints, preemption; then the
  final held-out evaluation."""
  config, builder, num_steps = plan.config, plan.builder, plan.num_steps
  start_step = int(jax.device_get(state.step))
  writer = _create_writer(workdir)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
  p_train_step = steps.pmap_train_step(config)
  p_eval_step = steps.pmap_eval_step(config)
  batches = steps.prefetch_to_device(
      input_pipeline.as_numpy(input_pipeline.train_dataset(builder, config, start_step)))
  progress = progress_lib.Progress(num_steps, config.batch_size)
  metrics = TrainMetrics(config.skip_nonfinite_steps)
  preemption = Preemption()
  held_out = None  # (step, metrics) of the newest held-out evaluation.
  try:
    for step in range(start_step + 1, num_steps + 1):
      state, step_metrics = p_train_step(state, next(batches), step_rng)
      metrics.add(step, step_metrics, state)
      if step == start_step + 1:
        jax.block_until_ready(step_metrics)
        logging.info('First step done (compilation included).')
        progress.restart(step)
      if is_time(step, config.log_every_steps, num_steps):
        _log_train(writer, step, num_steps, metrics.summary(state), progress)
      if is_time(step, plan.eval_every, num_steps):
        held_out = step, held_out_metrics(p_eval_step, state, builder, config)
        _log_held_out(writer, step, held_out[1])
        if step % plan.eval_every == 0:
          state = plateau_step(state, config, step, held_out[1]['top1_error'], writer)
        progress.restart(step)
      if config.eval_protocols and is_time(step, config.eval_protocols_every_steps, num_steps):
        evaluate_protocols(state, builder, config, workdir, step, writer,
                           final=step == num_steps)
        progress.restart(step)
      preempted = preemption.reached(step) and step < num_steps
      if is_time(step, config.checkpoint_every_steps, num_steps) or preempted:
        metrics.check_all(state)
        checkpoints.save(manager, state, config)
        logging.info('Saving checkpoint of step %d in %s.', step, manager.directory)
      if preempted:
        return _stopped(manager, writer, preemption, step)
    checkpoints.wait_until_finished(manager)
  except BaseException:
    # Whatever stopped the loop, a save already under way may complete; its own failure, if
    # any, is secondary to what stopped the loop.
    with contextlib.suppress(Exception):
      manager.wait_until_finished()
    raise
  finally:
    preemption.close()
  writer.flush()
  skipped = int(jax.device_get(state.nonfinite_steps))
  if skipped:
    logging.warning('%d step(s) had a non-finite loss or gradient and were skipped.', skipped)
  if held_out is None:  # A run resumed at its last step: the loop ran no step.
    held_out = num_steps, held_out_metrics(p_eval_step, state, builder, config)
  return _final_result(workdir, config, num_steps, held_out[1])


def _stopped(manager, writer, preemption: Preemption, step: int) -> dict:
  """Ends a run stopped by SIGTERM or Ctrl-C once the checkpoint of `step` is on disk."""
  checkpoints.wait_until_finished(manager)
  preemption.check_aborted()
  writer.flush()
  logging.warning('Stopped by %s at step %d: its checkpoint is saved in %s. Run the same '
                  'command again to resume there.', preemption.requested_by or 'SIGTERM', step,
                  manager.directory)
  return {'preempted_at_step': step}


def _log_train(writer, step: int, num_steps: int, summary: dict,
               progress: progress_lib.Progress) -> None:
  img_per_s, eta = progress.rate(step)
  writer.write_scalars(step, {**{f'train/{k}': v for k, v in summary.items()},
                              'train/img_per_s': img_per_s})
  logging.info('step %d/%d: loss %.4f, top-1 err %.2f%%, top-5 err %.2f%%, lr %.3g, '
               '%s img/s, ETA %s', step, num_steps, summary['loss'],
               100 * summary['top1_error'], 100 * summary['top5_error'],
               summary['learning_rate'], progress_lib.rate(img_per_s),
               progress_lib.duration(eta))


def _log_held_out(writer, step: int, held_out: dict) -> None:
  writer.write_scalars(step, {f'eval/{k}': v for k, v in held_out.items()})
  logging.info('step %d eval on %d examples: loss %.4f, top-1 err %.2f%%, top-5 err '
               '%.2f%%', step, held_out['num_examples'], held_out['loss'],
               100 * held_out['top1_error'], 100 * held_out['top5_error'])


def _final_result(workdir: str, config, step: int, held_out: dict) -> dict:
  """The held-out error at the end of training, written to WORKDIR/eval_metrics.json."""
  result = {'step': step, 'top1_error': held_out['top1_error'],
            'top5_error': held_out['top5_error'], 'num_examples': held_out['num_examples']}
  if jax.process_index() == 0:
    (epath.Path(workdir) / 'eval_metrics.json').write_text(json.dumps(result, indent=2))
  logging.info('Final held-out %s: top-1 error %.2f%%, top-5 error %.2f%% over %d images.',
               config.eval_split, 100 * result['top1_error'], 100 * result['top5_error'],
               result['num_examples'])
  return result
