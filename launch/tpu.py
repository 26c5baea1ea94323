"""vgg_jax.main on a Cloud TPU VM pod slice, with gcloud: create, set up, run, copy back, delete.

  python -m launch.tpu --name=vgg-d --zone=us-central2-b --accelerator_type=v4-32 -- \
    --config=experiments/configD.py --workdir=gs://BUCKET/vgg/D \
    --config.data_dir=gs://BUCKET/tensorflow_datasets

A pod slice is several hosts (a v4-32 has 4, each with 4 chips); every host runs the same
command (`--worker=all`) and main's `jax.distributed.initialize()` finds the others by itself.
Each host reads its own shard of the data; the training split, which ArrayRecord cannot read on
gs://, is copied once into each host's --config.random_access_dir (docs/pods.md). Checkpoints
are written by all hosts together, so the workdir must be storage they share: a gs:// bucket.
The code reaches the hosts as a copy of this checkout (`gcloud ... scp --recurse`) or, with
--repo_url, a git clone. Each run's console output is kept in REMOTE_DIR/logs on every host and
copied back from worker 0 into --logs_dir, with the workdir itself if it is not on GCS. The VM
is deleted at the end, also after a failure or Ctrl-C, unless --keep. --dry-run prints the
commands, one per line (NAME and ZONE standing for a missing --name or --zone).
"""

import os
import shlex
import subprocess
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags

from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_string('name', None, 'TPU VM name (required).')
flags.DEFINE_string('zone', None, 'GCP zone, e.g. us-central2-b (required).')
flags.DEFINE_string('accelerator_type', 'v4-8', 'TPU type, e.g. v4-32 (4 hosts), v5litepod-16.')
flags.DEFINE_string('version', 'tpu-ubuntu2204-base', 'TPU VM software version (image).')
flags.DEFINE_string('project', None, 'GCP project; default: gcloud\'s configured one.')
flags.DEFINE_bool('spot', False, 'Create a Spot TPU VM (cheaper, may be preempted).')
flags.DEFINE_string('repo_url', None, 'git clone this on the hosts instead of copying the '
                    'local checkout.')
flags.DEFINE_string('remote_dir', 'vgg_jax', 'Where the code goes on each host (relative to '
                    'the home directory).')
flags.DEFINE_string('logs_dir', 'tpu_logs', 'Local directory; logs land in LOGS_DIR/NAME.')
flags.DEFINE_bool('keep', False, 'Keep the TPU VM after the run (delete it yourself).')

# What pip needs to install vgg_jax: the package, its configs, the metadata files, and the
# versions it was tested with (constraints.txt, as the README's commands install it).
SOURCES = ('vgg_jax', 'experiments', 'setup.cfg', 'pyproject.toml', 'README.md',
           'constraints.txt')


def _tpu_vm(verb: str, *args: str, zone: str, project: Optional[str]) -> list[str]:
  """`gcloud compute tpus tpu-vm VERB ARGS --zone=Z [--project=P]`."""
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *args, f'--zone={zone}',
          *([f'--project={project}'] if project else [])]


def _ssh_all(name: str, zone: str, project: Optional[str], remote_command: str) -> list[str]:
  return _tpu_vm('ssh', name, zone=zone, project=project) + [
      '--worker=all', f'--command={remote_command}']


def create_command(name: str, zone: str, accelerator_type: str, version: str,
                   project: Optional[str] = None, spot: bool = False) -> list[str]:
  return _tpu_vm('create', name, zone=zone, project=project) + [
      f'--accelerator-type={accelerator_type}', f'--version={version}',
      *(['--spot'] if spot else [])]


def setup_commands(name: str, zone: str, project: Optional[str] = None,
                   repo_url: Optional[str] = None, remote_dir: str = 'vgg_jax',
                   source_dir: Optional[str] = None) -> list[list[str]]:
  """Code onto every host (clone, or scp of this checkout), then vgg_jax and jax[tpu] at
  constraints.txt's versions."""
  remote = shlex.quote(remote_dir)
  install = (f'cd {remote} && python3 -m pip install -q -U pip && '
             f'python3 -m pip install -q -e . "jax[tpu]" -c constraints.txt')
  if repo_url:
    return [_ssh_all(name, zone, project, f'set -e; git clone --depth=1 '
                     f'{shlex.quote(repo_url)} {remote}; {install}')]
  source_dir = source_dir or common.repo_dir()
  scp = _tpu_vm('scp', '--recurse', *(os.path.join(source_dir, s) for s in SOURCES),
                f'{name}:{remote_dir}', zone=zone, project=project) + ['--worker=all']
  return [_ssh_all(name, zone, project, f'mkdir -p {remote}'), scp,
          _ssh_all(name, zone, project, install)]


def run_command(name: str, zone: str, main_args: Sequence[str], project: Optional[str] = None,
                remote_dir: str = 'vgg_jax', log_name: str = 'run.log') -> list[str]:
  """main on every host at once; its output also goes to REMOTE_DIR/logs/LOG_NAME there."""
  main = common.shell(['python3', '-m', 'vgg_jax.main', *main_args])
  log = shlex.quote(f'logs/{log_name}')
  return _ssh_all(name, zone, project,
                  f'set -o pipefail; cd {shlex.quote(remote_dir)} && mkdir -p logs && '
                  f'{main} 2>&1 | tee {log}')


def copy_back_commands(name: str, zone: str, workdirs: Sequence[str], logs_dir: str,
                       project: Optional[str] = None,
                       remote_dir: str = 'vgg_jax') -> list[list[str]]:
  """Logs, and workdirs not on GCS, from worker 0 into LOGS_DIR/NAME."""
  local = os.path.join(logs_dir, name)
  remote_paths = [f'{name}:{remote_dir}/logs']
  for workdir in workdirs:
    if not common.is_remote(workdir):
      path = workdir if os.path.isabs(workdir) else f'{remote_dir}/{workdir}'
      remote_paths.append(f'{name}:{path}')
  return [['mkdir', '-p', local],
          _tpu_vm('scp', '--recurse', *remote_paths, local, zone=zone, project=project) +
          ['--worker=0']]


def delete_command(name: str, zone: str, project: Optional[str] = None) -> list[str]:
  return _tpu_vm('delete', name, zone=zone, project=project) + ['--quiet']


def steps(name: str, zone: str, accelerator_type: str, version: str,
          runs: Sequence[tuple[str, Sequence[str]]], *, project: Optional[str] = None,
          spot: bool = False, repo_url: Optional[str] = None, remote_dir: str = 'vgg_jax',
          logs_dir: str = 'tpu_logs', keep: bool = False,
          source_dir: Optional[str] = None) -> list[tuple[str, list[str]]]:
  """(kind, command) for one VM serving `runs` ((log name, main flags)) one after another.

  kind is 'create', 'setup', 'run', 'logs' or 'delete'; `execute` treats them differently
  after a failure.
  """
  plan = [('create', create_command(name, zone, accelerator_type, version, project, spot))]
  plan += [('setup', c) for c in setup_commands(name, zone, project, repo_url, remote_dir,
                                                source_dir)]
  plan += [('run', run_command(name, zone, args, project, remote_dir, f'{log_name}.log'))
           for log_name, args in runs]
  workdirs = [w for _, args in runs if (w := common.workdir_of(args))]
  plan += [('logs', c) for c in copy_back_commands(name, zone, workdirs, logs_dir, project,
                                                   remote_dir)]
  if not keep:
    plan.append(('delete', delete_command(name, zone, project)))
  return plan


def commands(name: str, zone: str, accelerator_type: str, version: str,
             main_args: Sequence[str], **kwargs) -> list[list[str]]:
  """The gcloud (and mkdir) commands of one run, in order; kwargs as in `steps`."""
  return [c for _, c in steps(name, zone, accelerator_type, version, [('run', main_args)],
                              **kwargs)]


def execute(plan: Sequence[tuple[str, list[str]]]) -> int:
  """Runs the steps in order, stopping at the first failure; its exit code.

  After a failed run the logs are still copied back, and the VM is deleted whatever happened
  (Ctrl-C included): an idle pod slice costs as much as a busy one.
  """
  failure, reached_run = 0, False
  try:
    for kind, command in plan:
      if kind == 'delete' or (failure and not (kind == 'logs' and reached_run)):
        continue
      reached_run |= kind == 'run'
      print('+', common.shell(command), flush=True)
      try:
        subprocess.run(command, check=True)
      except subprocess.CalledProcessError as e:
        failure = failure or e.returncode
  finally:
    for kind, command in plan:
      if kind == 'delete':
        print('+', common.shell(command), flush=True)
        code = subprocess.run(command, check=False).returncode
        failure = failure or code
  return failure


def steps_from_flags(runs: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[str, list[str]]]:
  """`steps` with this module's flags (launch.sweep uses it too); a dry run without --name or
  --zone shows NAME and ZONE, so that a plan needs neither."""
  name, zone = FLAGS.name, FLAGS.zone
  if not name or not zone:
    if not FLAGS.dry_run:
      raise app.UsageError('--name and --zone are required for a TPU VM.')
    print('# Dry run without --name or --zone: NAME and ZONE stand for them; a real run needs '
          'both.', flush=True)
    name, zone = name or 'NAME', zone or 'ZONE'
  return steps(name, zone, FLAGS.accelerator_type, FLAGS.version, runs,
               project=FLAGS.project, spot=FLAGS.spot, repo_url=FLAGS.repo_url,
               remote_dir=FLAGS.remote_dir, logs_dir=FLAGS.logs_dir, keep=FLAGS.keep)


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('Pass the flags for vgg_jax.main after --, e.g. '
                         'python -m launch.tpu --name=N --zone=Z -- --config=... --workdir=...')
  plan = steps_from_flags([('run', argv[1:])])
  if FLAGS.dry_run:
    for _, command in plan:
      print(common.shell(command))
    return
  sys.exit(execute(plan))


if __name__ == '__main__':
  app.run(main)
