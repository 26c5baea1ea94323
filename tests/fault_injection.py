"""Fault injection: SIGKILL training runs at random moments and check that nothing is lost.

    python -m tests.fault_injection --trials=20

Each trial trains a small net on the digits in a fresh workdir and kills the process with
SIGKILL (no handler can run) one or more times: at a random training step, or the moment a
checkpoint write has started (its temporary directory appears on disk). After every kill the
workdir is opened the way a new run opens it and its newest checkpoint is restored in full;
then the same command is rerun, as a scheduler would, until one run finishes. The finished
parameters must equal, bitwise, those of one uninterrupted run of the same command.

Prints one line per kill and a summary (trials, kills, kills during a checkpoint write,
restores, steps lost, data lost) and exits 1 if anything was lost.
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional, Sequence

from launch import local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 40
# Narrow net A on the digits; 40 steps cross an epoch (22 steps of 64) and four plateau
# evaluations; a checkpoint every 3 steps, two kept, so saves and deletions are frequent.
FLAGS = ('--config=experiments/digits.py', '--config.variant=A', '--config.width=0.0625',
         '--config.batch_size=64', f'--config.num_train_steps={NUM_STEPS}',
         '--config.log_every_steps=1', '--config.eval_every_steps=10',
         '--config.checkpoint_every_steps=3', '--config.keep_checkpoints=2')
STEP_LINE = re.compile(r'step (\d+)/\d+: loss')
TMP_MARK = 'orbax-checkpoint-tmp'


@dataclasses.dataclass
class Kill:
  trial: int
  mode: str  # 'step' or 'checkpoint-write'
  last_logged_step: int
  during_write: bool  # A checkpoint's temporary directory was on disk at the kill.
  restored_step: int
  restore_ok: bool


class Run:
  """`python -m vgg_jax.main` in its own session, its log lines watched as they come; with
  `devices`, on that many CPU devices of its own (one process of several, see `start_hosts`)."""

  def __init__(self, workdir: str, data_dir: str, cache_dir: Optional[str],
               flags: Sequence[str] = FLAGS, devices: Optional[int] = None):
    env = {k: v for k, v in os.environ.items()
           if k not in ('XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR')}
    if devices is not None:
      env = local.process_env(env, 0, devices, 'cpu')
    env['TF_CPP_MIN_LOG_LEVEL'] = '2'
    if cache_dir:
      # JAX's persistent compilation cache, as a preemptible job would use it: reruns start
      # without compiling again. The cached executables compute exactly what compiling does.
      env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
    self.last_step = 0
    self.lines = []
    self.process = subprocess.Popen(
        [sys.executable, '-m', 'vgg_jax.main', f'--workdir={workdir}', *flags,
         f'--config.data_dir={data_dir}'],
        cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        start_new_session=True)
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()

  def _read(self):
    for line in self.process.stderr:
      self.lines.append(line)
      match = STEP_LINE.search(line)
      if match:
        self.last_step = int(match.group(1))

  def kill(self):
    os.killpg(self.process.pid, signal.SIGKILL)
    self.process.wait()
    self.reader.join()

  def wait(self, timeout: float = 600) -> int:
    code = self.process.wait(timeout)
    self.reader.join()
    return code

  def stop(self):
    """SIGKILL, if still running: no process outlives a failed test."""
    if self.process.poll() is None:
      self.kill()


def free_ports(n: int) -> list[int]:
  """`n` distinct ports nobody listens on now, for jobs started at the same time."""
  with contextlib.ExitStack() as stack:
    sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
    for s in sockets:
      s.bind(('localhost', 0))
    return [s.getsockname()[1] for s in sockets]


def start_hosts(workdir: str, data_dir: str, flags: Sequence[str], port: int,
                num_processes: int = 2, devices_per_process: int = 2) -> list[Run]:
  """The same command as `num_processes` processes joined by jax.distributed (gloo) through
  localhost:`port`, each on CPU devices of its own, as launch.local starts them; one Run
  each, so that a test can signal one of them.

  Without the persistent compilation cache: JAX writes it from process 0 only and keys the
  other processes' executables apart, so with it process 0 would skip compiling while the
  others compile, and reach the first collective that much sooner; gloo gives up on a peer
  30 s late, which a loaded machine can be.
  """
  address = f'localhost:{port}'
  return [Run(workdir, data_dir, None,
              (*flags, f'--coordinator_address={address}', f'--num_processes={num_processes}',
               f'--process_id={i}'), devices=devices_per_process)
          for i in range(num_processes)]


def writing(checkpoint_dir: str) -> bool:
  try:
    return any(TMP_MARK in name for name in os.listdir(checkpoint_dir))
  except FileNotFoundError:
    return False


def kill_at_step(run: Run, step: int, rng: random.Random) -> None:
  while run.process.poll() is None and run.last_step < step:
    time.sleep(0.002)
  time.sleep(rng.uniform(0, 0.05))
  run.kill()


def kill_during_write(run: Run, checkpoint_dir: str, nth: int) -> None:
  """SIGKILL as soon as the nth checkpoint write of this run has started."""
  seen, was_writing = 0, False
  while run.process.poll() is None:
    now_writing = writing(checkpoint_dir)
    if now_writing and not was_writing:
      seen += 1
      if seen == nth:
        break
    was_writing = now_writing
    time.sleep(0.0005)
  run.kill()


def restore(workdir: str):
  """(step, params) of WORKDIR's newest checkpoint, restored in full as a resuming run does;
  (0, None) when there is none."""
  import jax  # pylint: disable=g-import-not-at-top
  from vgg_jax import checkpoints, steps  # pylint: disable=g-import-not-at-top
  try:
    config = checkpoints.load_config(workdir)
  except FileNotFoundError:
    return 0, None
  state = steps.create_train_state(config, jax.random.key(0), config.image_size)
  restored = checkpoints.restore_latest(checkpoints.create_manager(workdir, config), state)
  return int(jax.device_get(restored.step)), jax.device_get(restored.params)


def same(a, b) -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run_trials(trials: int, root: str, data_dir: str, seed: int, max_kills: int = 2,
               log=functools.partial(print, flush=True)) -> dict:
  """Runs the experiment; returns the summary (also printed through `log`)."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = random.Random(seed)
  cache_dir = os.path.join(root, 'jax_cache')
  if not jax.config.jax_compilation_cache_dir:  # This process restores workdirs, many times.
    jax.config.update('jax_compilation_cache_dir', cache_dir)
  reference = os.path.join(root, 'reference')
  run = Run(reference, data_dir, cache_dir)
  if run.wait() != 0:
    raise RuntimeError('The uninterrupted run failed:\n' + ''.join(run.lines[-30:]))
  ref_step, ref_params = restore(reference)
  assert ref_step == NUM_STEPS, ref_step
  kills, launches, mismatched = [], 1, []
  for trial in range(trials):
    workdir = os.path.join(root, f'trial_{trial}')
    checkpoint_dir = os.path.join(workdir, 'checkpoints')
    for kill in range(rng.randint(1, max_kills)):
      before, _ = restore(workdir)
      if before >= NUM_STEPS - 1:
        break
      run = Run(workdir, data_dir, cache_dir)
      launches += 1
      mode = ('checkpoint-write', 'step')[(trial + kill) % 2]
      if mode == 'step':
        kill_at_step(run, rng.randint(before + 1, NUM_STEPS - 1), rng)
      else:
        kill_during_write(run, checkpoint_dir, rng.randint(1, 3))
      during_write = writing(checkpoint_dir)
      try:
        restored_step, _ = restore(workdir)
        ok = True
      except Exception as e:  # pylint: disable=broad-except  # Counted as data lost.
        restored_step, ok = -1, False
        log(f'  restore failed: {type(e).__name__}: {e}')
      kills.append(Kill(trial, mode, max(run.last_step, before), during_write, restored_step,
                        ok))
      log(f'trial {trial}: SIGKILL ({mode}) after step {kills[-1].last_logged_step}, '
          f'{"during a checkpoint write" if during_write else "between writes"}; '
          f'restores step {restored_step}' + ('' if ok else ' (FAILED)'))
    run = Run(workdir, data_dir, cache_dir)
    launches += 1
    if run.wait() != 0:
      raise RuntimeError(f'trial {trial}: the final run failed:\n' + ''.join(run.lines[-30:]))
    step, params = restore(workdir)
    if step != NUM_STEPS or not same(params, ref_params):
      mismatched.append(trial)
      log(f'trial {trial}: final parameters differ from the uninterrupted run')
  summary = {
      'trials': trials, 'launches': launches, 'kills': len(kills),
      'kills_during_checkpoint_write': sum(k.during_write for k in kills),
      'restores': sum(k.restore_ok for k in kills),
      'failed_restores': sum(not k.restore_ok for k in kills),
      'steps_lost_total': sum(max(0, k.last_logged_step - k.restored_step) for k in kills
                              if k.restore_ok),
      'steps_lost_max': max([k.last_logged_step - k.restored_step for k in kills
                             if k.restore_ok] or [0]),
      'final_params_differ': len(mismatched),
  }
  summary['data_lost'] = summary['failed_restores'] + summary['final_params_differ']
  log(json.dumps(summary, indent=2))
  return summary


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--trials', type=int, default=20)
  parser.add_argument('--max_kills', type=int, default=2, help='SIGKILLs per trial, at most.')
  parser.add_argument('--seed', type=int, default=None, help='Default: a fresh one.')
  parser.add_argument('--workdir', default=None, help='Default: a temporary directory.')
  parser.add_argument('--data_dir', default=None, help='tfds data_dir for the digits.')
  args = parser.parse_args()
  seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
  print(f'seed {seed}', flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    root = args.workdir or tmp
    summary = run_trials(args.trials, root, args.data_dir or os.path.join(root, 'tfds'), seed,
                         args.max_kills)
  sys.exit(1 if summary['data_lost'] else 0)


if __name__ == '__main__':
  main()
