"""Several `python -m vgg_jax.main` processes on this machine, each acting as one host.

  python -m launch.local --num_processes=2 --devices_per_process=4 -- \
    --config=experiments/digits.py --workdir=workdirs/digits_2proc

Each process gets `--coordinator_address=localhost:PORT --num_processes=N --process_id=I`, so
main joins jax.distributed as it would on a pod, and devices of its own: on CPU
`--devices_per_process` fake devices (XLA_FLAGS), on GPU its own slice of CUDA_VISIBLE_DEVICES.
That exercises the multi-host paths (a data shard per process, cross-process pmean, evaluation
counting every example once) on one machine. Process 0's output is streamed with a `[0] `
prefix; the others' (the same lines again) and gloo's connection notices only with
`--all_output`, except the last lines of a process that fails. If one process fails the others
are stopped (they would wait for it forever in the next collective) and its exit code is
returned.
"""

import collections
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Optional, Sequence, TextIO

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_processes', 2, 'Processes to start, each one "host".')
flags.DEFINE_integer('devices_per_process', 1, 'CPU: fake devices per process; GPU: GPUs per '
                     'process, consecutive slices of CUDA_VISIBLE_DEVICES (or of 0, 1, ...).')
flags.DEFINE_integer('port', 0, 'Coordinator port on localhost; 0 picks a free one.')
flags.DEFINE_enum('platform', 'cpu', ['cpu', 'gpu'], 'Which devices the processes use.')
flags.DEFINE_string('module', 'vgg_jax.main', 'Python module to run (tests run a fake one).')
flags.DEFINE_bool('all_output', False, 'Print every process\'s output and gloo\'s connection '
                  'notices, not only process 0\'s.')

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long.
# gloo's connection notice, whole or in the fragments two of its threads leave when they write
# at once ('[Gloo] Rank [Gloo] Rank 0 is connected to ...' then '0 is connected to ...').
GLOO_NOTICE = re.compile(r'\[Gloo\] Rank|^\d+ is connected to \d+ peer ranks')
# Lines kept of a process whose output is not shown, printed if it fails.
FAILURE_TAIL = 40


def free_port() -> int:
  """A port nobody listens on now (the coordinator binds it a moment later)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env(base: Mapping[str, str], process_id: int, devices_per_process: int,
                platform: str) -> dict[str, str]:
  """The environment of process `process_id`: its devices, unbuffered output."""
  env = dict(base)
  env['PYTHONUNBUFFERED'] = '1'
  if platform == 'cpu':
    # Replace, not add to, a device count inherited from the caller (tests set 8).
    xla_flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env['XLA_FLAGS'] = ' '.join(xla_flags + [f'{DEVICE_COUNT_FLAG}={devices_per_process}'])
    env['JAX_PLATFORMS'] = 'cpu'
  else:
    visible = env.get('CUDA_VISIBLE_DEVICES')
    gpus = visible.split(',') if visible else None
    start, stop = process_id * devices_per_process, (process_id + 1) * devices_per_process
    if gpus is not None and len(gpus) < stop:
      raise ValueError(f'Process {process_id} needs GPUs {start}..{stop - 1} but '
                       f'CUDA_VISIBLE_DEVICES={visible} has {len(gpus)}.')
    env['CUDA_VISIBLE_DEVICES'] = ','.join(gpus[start:stop] if gpus is not None
                                           else map(str, range(start, stop)))
  return env


def _stream(process: subprocess.Popen, prefix: str, out: TextIO, lock: threading.Lock,
            show: bool, tail: collections.deque, all_output: bool) -> None:
  """Copies the process's lines to `out` when `show`, else keeps the last ones in `tail`;
  gloo's connection notices only with `all_output`."""
  for line in process.stdout:
    if not all_output and GLOO_NOTICE.search(line):
      continue
    line = prefix + line if line.endswith('\n') else prefix + line + '\n'
    if not show:
      tail.append(line)
      continue
    with lock:
      out.write(line)
      out.flush()


def _stop(processes: Sequence[subprocess.Popen]) -> None:
  """SIGTERM the still running ones, SIGKILL what is left after STOP_GRACE_S."""
  running = [p for p in processes if p.poll() is None]
  for p in running:
    p.terminate()
  deadline = time.monotonic() + STOP_GRACE_S
  for p in running:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def _exit_code(returncode: int) -> int:
  """A process killed by signal S reports -S; a shell would say 128 + S."""
  return 128 - returncode if returncode < 0 else returncode


def run(num_processes: int, devices_per_process: int, main_args: Sequence[str], *,
        port: int = 0, platform: str = 'cpu', module: str = 'vgg_jax.main',
        env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
        out: Optional[TextIO] = None, poll_s: float = 0.1, all_output: bool = False) -> int:
  """Runs `python -m module main_args` as `num_processes` processes; the first failure's code.

  The distributed flags are appended only for two or more processes, so a single process is a
  plain run of main. Only process 0's output is shown unless `all_output`.
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f'num_processes={num_processes} and devices_per_process='
                     f'{devices_per_process} must be at least 1.')
  out = out or sys.stdout
  base = os.environ if env is None else env
  address = f'localhost:{port or free_port()}'
  lock = threading.Lock()
  processes, streams = [], []
  tails = [collections.deque(maxlen=FAILURE_TAIL) for _ in range(num_processes)]
  try:
    for i in range(num_processes):
      command = [sys.executable, '-m', module, *main_args]
      if num_processes > 1:
        command += [f'--coordinator_address={address}', f'--num_processes={num_processes}',
                    f'--process_id={i}']
      process = subprocess.Popen(
          command, cwd=cwd, env=process_env(base, i, devices_per_process, platform),
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors='replace')
      processes.append(process)
      streams.append(threading.Thread(
          target=_stream, args=(process, f'[{i}] ', out, lock, all_output or i == 0, tails[i],
                                all_output), daemon=True))
      streams[-1].start()

    failure, pending = 0, list(range(num_processes))
    while pending:
      for i in list(pending):
        returncode = processes[i].poll()
        if returncode is None:
          continue
        pending.remove(i)
        if returncode and not failure:
          failure = _exit_code(returncode)
          streams[i].join(timeout=5)
          with lock:
            out.writelines(tails[i])
            out.write(f'[launch] process {i} exited with {returncode}; stopping the others.\n')
            out.flush()
          _stop([processes[j] for j in pending])
      if pending:
        time.sleep(poll_s)
    return failure
  finally:
    _stop(processes)  # Only does something on an exception (Ctrl-C): no orphans.
    for thread in streams:
      thread.join(timeout=5)


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('Pass the flags for vgg_jax.main after --, e.g. '
                         'python -m launch.local --num_processes=2 -- --config=... --workdir=...')
  sys.exit(run(FLAGS.num_processes, FLAGS.devices_per_process, argv[1:], port=FLAGS.port,
               platform=FLAGS.platform, module=FLAGS.module, all_output=FLAGS.all_output))


if __name__ == '__main__':
  app.run(main)
