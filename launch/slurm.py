"""vgg_jax.main on a SLURM GPU cluster: writes an sbatch script and submits it.

  python -m launch.slurm --nodes=2 --gpus_per_node=8 --partition=gpu --time=72:00:00 -- \
    --config=experiments/configD.py --workdir=/shared/vgg/D \
    --config.data_dir=/shared/tensorflow_datasets

`srun` starts the tasks and sets SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID
and SLURM_LOCALID in each; main sees SLURM_NTASKS > 1 and calls `jax.distributed.initialize()`,
which reads them: process 0 (first node) coordinates, on a port derived from the job id.
  --process_per=node  one task per node driving all its GPUs. jax.distributed would otherwise
                      keep only GPU SLURM_LOCALID (= 0), so the script exports
                      JAX_LOCAL_DEVICE_IDS=0,...,G-1.
  --process_per=gpu   one task per GPU. Every task sees the node's GPUs and jax.distributed
                      keeps GPU SLURM_LOCALID only, so each task sees one GPU. Do not add
                      --gpus-per-task or --gpu-bind: they renumber the GPUs each task sees.
Either way each process reads its own shard of the data and the workdir must be on a file
system all nodes share. The script goes to --script_dir (default: the workdir) with the job's
log, slurm-JOBID.out, beside it. --dry-run prints the script and the sbatch command.
"""

import os
import shlex
import subprocess
from typing import Optional, Sequence

from absl import app
from absl import flags

from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_integer('nodes', 1, 'Nodes to allocate.')
flags.DEFINE_integer('gpus_per_node', 8, 'GPUs per node.')
flags.DEFINE_enum('process_per', 'node', ['node', 'gpu'], 'One process per node (all its '
                  'GPUs) or one per GPU.')
flags.DEFINE_string('partition', None, 'SLURM partition; default: the cluster\'s.')
flags.DEFINE_string('time', None, 'Time limit, HH:MM:SS or D-HH:MM:SS; default: the '
                    'partition\'s.')
flags.DEFINE_string('account', None, 'SLURM account to charge.')
flags.DEFINE_integer('cpus_per_gpu', 8, 'CPU cores per GPU for the tf.data input pipeline.')
flags.DEFINE_string('job_name', 'vgg_jax', 'SLURM job name.')
flags.DEFINE_string('script_dir', None, 'Where the sbatch script and the job log go; default: '
                    'the workdir (which then must be a local or shared path, not gs://).')
flags.DEFINE_string('setup', None, 'Shell lines run before srun, e.g. "source .venv/bin/'
                    'activate" or "module load cuda".')


def script(nodes: int, gpus_per_node: int, main_args: Sequence[str], *,
           process_per: str = 'node', partition: Optional[str] = None,
           time: Optional[str] = None, account: Optional[str] = None, cpus_per_gpu: int = 8,
           job_name: str = 'vgg_jax', log_dir: str = '.', repo_dir: Optional[str] = None,
           setup: Optional[str] = None) -> str:
  """The sbatch script: #SBATCH lines, the environment jax.distributed needs, srun main."""
  if process_per not in ('node', 'gpu'):
    raise ValueError(f'process_per={process_per!r}: expected "node" or "gpu".')
  tasks_per_node = 1 if process_per == 'node' else gpus_per_node
  gpus_per_task = gpus_per_node // tasks_per_node
  sbatch = {'job-name': job_name, 'nodes': nodes, 'ntasks-per-node': tasks_per_node,
            'gpus-per-node': gpus_per_node, 'cpus-per-task': cpus_per_gpu * gpus_per_task,
            'time': time, 'partition': partition, 'account': account,
            'output': os.path.join(log_dir, 'slurm-%j.out')}
  lines = ['#!/bin/bash',
           f'# launch/slurm.py: {nodes} node(s) x {gpus_per_node} GPU(s), one process per '
           f'{process_per}.']
  lines += [f'#SBATCH --{key}={value}' for key, value in sbatch.items() if value is not None]
  lines += ['', 'set -eo pipefail', f'cd {shlex.quote(repo_dir or common.repo_dir())}']
  if setup:
    lines.append(setup)
  lines += ['# jax.distributed.initialize() reads SLURM_JOB_ID, SLURM_STEP_NODELIST, '
            'SLURM_NTASKS,',
            '# SLURM_PROCID and SLURM_LOCALID, which srun sets for every task.']
  if process_per == 'node':
    lines += ['# One process drives all GPUs of its node (else jax keeps GPU SLURM_LOCALID).',
              f'export JAX_LOCAL_DEVICE_IDS={",".join(map(str, range(gpus_per_node)))}']
  else:
    lines += ['# One process per GPU: jax.distributed keeps GPU SLURM_LOCALID of the node\'s '
              'GPUs.']
  lines += ['export PYTHONUNBUFFERED=1',
            'srun --label --kill-on-bad-exit=1 ' +
            common.shell(['python', '-m', 'vgg_jax.main', *main_args])]
  return '\n'.join(lines) + '\n'


def script_path(main_args: Sequence[str], script_dir: Optional[str] = None,
                name: str = 'vgg_jax') -> str:
  """SCRIPT_DIR/NAME.sbatch; SCRIPT_DIR defaults to main's --workdir."""
  directory = script_dir or common.workdir_of(main_args)
  if directory is None or common.is_remote(directory):
    raise app.UsageError(f'Cannot put the sbatch script in {directory!r}: pass --script_dir '
                         '(a path the cluster nodes see).')
  return os.path.abspath(os.path.join(directory, f'{name}.sbatch'))


def sbatch_command(path: str, after: Optional[str] = None) -> list[str]:
  """`sbatch --parsable [--dependency=afterok:JOB] PATH`: prints the job id alone."""
  return ['sbatch', '--parsable', *([f'--dependency=afterok:{after}'] if after else []), path]


def submit(path: str, text: str, after: Optional[str] = None) -> str:
  """Writes the script to `path`, submits it; the job id."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)
  result = subprocess.run(sbatch_command(path, after), check=True, capture_output=True,
                          text=True)
  job = result.stdout.strip().split(';')[0]  # 'JOBID' or 'JOBID;CLUSTER'.
  print(f'Submitted batch job {job}: {path}', flush=True)
  return job


def script_from_flags(main_args: Sequence[str], log_dir: str) -> str:
  """`script` with this module's flags (launch.sweep uses it too)."""
  return script(FLAGS.nodes, FLAGS.gpus_per_node, main_args, process_per=FLAGS.process_per,
                partition=FLAGS.partition, time=FLAGS.time, account=FLAGS.account,
                cpus_per_gpu=FLAGS.cpus_per_gpu, job_name=FLAGS.job_name, log_dir=log_dir,
                setup=FLAGS.setup)


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('Pass the flags for vgg_jax.main after --, e.g. '
                         'python -m launch.slurm --nodes=2 -- --config=... --workdir=...')
  main_args = argv[1:]
  path = script_path(main_args, FLAGS.script_dir, FLAGS.job_name)
  text = script_from_flags(main_args, os.path.dirname(path))
  if FLAGS.dry_run:
    print(text)
    print(common.shell(sbatch_command(path)))
    return
  submit(path, text)


if __name__ == '__main__':
  app.run(main)
