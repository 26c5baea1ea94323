"""The launchers: TPU and SLURM commands, the sweep's plan, local processes (with a fake main)."""

import contextlib
import io
import os
import shlex
import subprocess
import sys
import textwrap
import time

from absl import flags
from absl.testing import flagsaver
import pytest

from launch import common
from launch import local
from launch import slurm
from launch import sweep
from launch import tpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A value with spaces and parentheses: must reach main as one argument through every shell.
MAIN_ARGS = ('--config=experiments/configD.py:S=256', '--workdir=gs://bucket/vgg/D_S256',
             '--config.train_scale=(256, 512)')


@contextlib.contextmanager
def parsed_flags(*argv: str):
  """Parses argv as a launcher's command line; the flags' previous state afterwards."""
  was_parsed = flags.FLAGS.is_parsed()
  with flagsaver.flagsaver():
    remaining = flags.FLAGS(['launcher', *argv])
    try:
      yield remaining
    finally:
      if not was_parsed:
        flags.FLAGS.unparse_flags()


def run_cli(module, argv, capsys) -> str:
  """`python -m module argv` in this process (main's sys.exit(0) allowed); its stdout."""
  with parsed_flags(*argv) as remaining:
    try:
      module.main(remaining)
    except SystemExit as e:
      assert not e.code, e.code
  return capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Cloud TPU VM.


def remote_command(command) -> list[str]:
  """The words the TPU hosts' shell runs for an `ssh --command=...`."""
  return shlex.split(next(a for a in command if a.startswith('--command='))[len('--command='):])


def test_tpu_dry_run_creates_sets_up_runs_on_all_workers_copies_back_and_deletes(capsys):
  out = run_cli(tpu, ['--name=vgg-d', '--zone=us-central2-b', '--accelerator_type=v4-32',
                      '--version=tpu-ubuntu2204-base', '--project=proj', '--dry-run', '--',
                      *MAIN_ARGS], capsys)
  commands = [shlex.split(line) for line in out.strip().splitlines()]
  gcloud = [c for c in commands if c[0] == 'gcloud']
  assert all(c[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm'] and 'vgg-d' in ' '.join(c) and
             '--zone=us-central2-b' in c and '--project=proj' in c for c in gcloud)
  verbs = [c[4] for c in gcloud]
  assert verbs == ['create', 'ssh', 'scp', 'ssh', 'ssh', 'scp', 'delete']
  create, mkdir, copy, install, run, copy_back, delete = gcloud
  assert create[5] == 'vgg-d'
  assert '--accelerator-type=v4-32' in create and '--version=tpu-ubuntu2204-base' in create
  for command in (mkdir, copy, install, run):
    assert '--worker=all' in command
  assert '--recurse' in copy and copy[-4] == 'vgg-d:vgg_jax'
  assert os.path.join(REPO, 'vgg_jax') in copy and os.path.join(REPO, 'setup.cfg') in copy
  assert os.path.join(REPO, 'constraints.txt') in copy
  install_words = remote_command(install)
  assert 'jax[tpu]' in install_words and '-e' in install_words
  assert install_words[-2:] == ['-c', 'constraints.txt']  # The versions the tests passed with.
  words = remote_command(run)
  start = words.index('python3')
  assert words[start:start + 3 + len(MAIN_ARGS)] == ['python3', '-m', 'vgg_jax.main', *MAIN_ARGS]
  assert words[:3] == ['set', '-o', 'pipefail;'] and words[-2:] == ['tee', 'logs/run.log']
  assert '--worker=0' in copy_back and 'vgg-d:vgg_jax/logs' in copy_back
  assert not any(a.startswith('vgg-d:gs:') for a in copy_back)  # The GCS workdir stays there.
  assert delete[5:] == ['vgg-d', '--zone=us-central2-b', '--project=proj', '--quiet']


def test_tpu_commands_clone_a_repo_copy_a_local_workdir_back_and_keep_the_vm():
  commands = tpu.commands('vgg', 'europe-west4-a', 'v5litepod-16', 'v2-alpha-tpuv5-lite',
                          ['--config=experiments/configA.py', '--workdir=workdirs/A'],
                          repo_url='https://github.com/me/vgg_jax.git', keep=True, spot=True)
  assert [c[4] for c in commands if c[0] == 'gcloud'] == ['create', 'ssh', 'ssh', 'scp']
  assert '--spot' in commands[0] and not any('--project' in a for c in commands for a in c)
  assert remote_command(commands[1])[:6] == ['set', '-e;', 'git', 'clone', '--depth=1',
                                             'https://github.com/me/vgg_jax.git']
  assert 'vgg:vgg_jax/workdirs/A' in commands[-1] and commands[-1][-3] == 'tpu_logs/vgg'


def test_tpu_execute_fetches_logs_and_deletes_the_vm_after_a_failed_run(monkeypatch):
  ran = []

  def fake_run(command, check):
    ran.append(command[0])
    if command[0] == 'run-fails' and check:
      raise subprocess.CalledProcessError(7, command)
    return subprocess.CompletedProcess(command, 0)

  monkeypatch.setattr(subprocess, 'run', fake_run)
  plan = [('create', ['create']), ('setup', ['setup']), ('run', ['run-fails']),
          ('run', ['second-run']), ('logs', ['logs']), ('delete', ['delete'])]
  assert tpu.execute(plan) == 7
  assert ran == ['create', 'setup', 'run-fails', 'logs', 'delete']
  ran.clear()
  assert tpu.execute([('create', ['run-fails']), ('run', ['run']), ('logs', ['logs']),
                      ('delete', ['delete'])]) == 7
  assert ran == ['run-fails', 'delete']  # No VM, no logs; deletion is still attempted.


# ---------------------------------------------------------------------------------------------
# SLURM.


def srun_words(text: str) -> list[str]:
  return shlex.split(next(line for line in text.splitlines() if line.startswith('srun ')))


def test_slurm_script_one_process_per_node_drives_all_its_gpus():
  text = slurm.script(2, 8, MAIN_ARGS, process_per='node', partition='gpu', time='72:00:00',
                      account='vision', log_dir='/logs', repo_dir='/code/vgg_jax')
  sbatch = [line for line in text.splitlines() if line.startswith('#SBATCH')]
  assert sbatch == ['#SBATCH --job-name=vgg_jax', '#SBATCH --nodes=2',
                    '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8',
                    '#SBATCH --cpus-per-task=64', '#SBATCH --time=72:00:00',
                    '#SBATCH --partition=gpu', '#SBATCH --account=vision',
                    '#SBATCH --output=/logs/slurm-%j.out']
  assert text.startswith('#!/bin/bash\n')
  assert 'cd /code/vgg_jax\n' in text
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7\n' in text
  assert srun_words(text) == ['srun', '--label', '--kill-on-bad-exit=1', 'python', '-m',
                              'vgg_jax.main', *MAIN_ARGS]


def test_slurm_script_one_process_per_gpu_leaves_the_gpu_choice_to_jax():
  text = slurm.script(4, 4, MAIN_ARGS, process_per='gpu', setup='source .venv/bin/activate')
  assert '#SBATCH --ntasks-per-node=4\n' in text and '#SBATCH --gpus-per-node=4\n' in text
  assert '#SBATCH --cpus-per-task=8\n' in text and '#SBATCH --nodes=4\n' in text
  assert 'JAX_LOCAL_DEVICE_IDS' not in text and '--gpus-per-task' not in text
  assert not any(k in text for k in ('--partition', '--time', '--account'))
  assert text.index('source .venv/bin/activate') < text.index('srun ')
  assert srun_words(text)[-len(MAIN_ARGS):] == list(MAIN_ARGS)


def test_slurm_dry_run_prints_the_script_and_the_sbatch_command_and_writes_nothing(
    tmp_path, capsys):
  workdir = tmp_path / 'D'
  args = ('--config=experiments/configD.py', f'--workdir={workdir}')
  out = run_cli(slurm, ['--nodes=2', '--gpus_per_node=8', '--process_per=gpu',
                        '--partition=gpu', '--dry-run', '--', *args], capsys)
  script_text, sbatch_line = out.rstrip('\n').rsplit('\n', 1)
  assert '#SBATCH --ntasks-per-node=8' in script_text
  assert f'#SBATCH --output={workdir}/slurm-%j.out' in script_text
  assert srun_words(script_text)[-2:] == list(args)
  assert sbatch_line == f'sbatch --parsable {workdir}/vgg_jax.sbatch'
  assert not workdir.exists()


def test_slurm_needs_a_script_dir_when_the_workdir_is_on_gcs():
  with pytest.raises(Exception, match='--script_dir'):
    slurm.script_path(MAIN_ARGS)
  assert slurm.script_path(MAIN_ARGS, '/shared/s') == '/shared/s/vgg_jax.sbatch'


# ---------------------------------------------------------------------------------------------
# Sweeps.

GRID_HEADER = '''
import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  config: str
  depends_on: Optional[str] = None
  init_mode: Optional[str] = None
  overrides: tuple = ()


def get_runs():
  return [
'''


def write_grid(tmp_path, *runs: str) -> str:
  """A grid module file; each of `runs` is a `Run(...)` expression."""
  path = tmp_path / 'grid.py'
  path.write_text(GRID_HEADER + ''.join(f'      {run},\n' for run in runs) + '  ]\n')
  return str(path)


def finish(root, name) -> None:
  os.makedirs(os.path.join(root, name), exist_ok=True)
  with open(os.path.join(root, name, 'eval_metrics.json'), 'w') as f:
    f.write('{"step": 1, "top1_error": 0.5, "top5_error": 0.1, "num_examples": 10}')


# Listed out of order on purpose: the plan puts each dependency first.
CHAIN = ("Run('D_S384', 'experiments/configD.py:S=384', 'D_S256', 'all', "
         "('--config.learning_rate=0.001',))",
         "Run('A_S256', 'experiments/configA.py:S=256')",
         "Run('D_S256', 'experiments/configD.py:S=256', 'A_S256', 'net_a', "
         "('--config.init=paper',))",
         "Run('A-LRN_S256', 'experiments/configA_LRN.py:S=256')")


def test_sweep_plan_puts_dependencies_first_and_wires_init_from(tmp_path):
  root = str(tmp_path / 'root')
  plan = sweep.plan(sweep.load_grid(write_grid(tmp_path, *CHAIN)), root, ['--config.seed=1'])
  assert [name for name, _ in plan] == ['A_S256', 'D_S256', 'D_S384', 'A-LRN_S256']
  argv = dict(plan)
  assert argv['A_S256'] == ['--config=experiments/configA.py:S=256',
                            f'--workdir={root}/A_S256', '--config.seed=1']
  assert argv['D_S384'] == ['--config=experiments/configD.py:S=384',
                            f'--workdir={root}/D_S384', f'--config.init_from={root}/D_S256',
                            '--config.init_mode=all', '--config.learning_rate=0.001',
                            '--config.seed=1']
  assert argv['D_S256'][2:5] == [f'--config.init_from={root}/A_S256', '--config.init_mode=net_a',
                                 '--config.init=paper']


def test_sweep_skips_finished_runs_and_starts_the_others_from_them(tmp_path):
  root = str(tmp_path / 'root')
  runs = sweep.load_grid(write_grid(tmp_path, *CHAIN))
  finish(root, 'A_S256')
  finish(root, 'D_S256')
  plan = sweep.plan(runs, root)
  assert [(name, args if args == 'skip' else 'run') for name, args in plan] == [
      ('A_S256', 'skip'), ('D_S256', 'skip'), ('D_S384', 'run'), ('A-LRN_S256', 'run')]
  assert f'--config.init_from={root}/D_S256' in dict(plan)['D_S384']
  assert sweep.plan(runs, root, only=['D_S384'])[0][0] == 'D_S384'


def test_sweep_only_needs_the_dependencies_finished_or_selected(tmp_path):
  root = str(tmp_path / 'root')
  runs = sweep.load_grid(write_grid(tmp_path, *CHAIN))
  with pytest.raises(ValueError, match="'D_S256' starts from 'A_S256', which is neither"):
    sweep.plan(runs, root, only=['D_S256', 'D_S384'])
  assert [n for n, _ in sweep.plan(runs, root, only=['D_S384', 'A_S256', 'D_S256'])] == [
      'A_S256', 'D_S256', 'D_S384']
  with pytest.raises(ValueError, match='--only names E_S256, not in the grid'):
    sweep.plan(runs, root, only=['E_S256'])


def test_sweep_rejects_unknown_dependencies_cycles_and_repeated_names(tmp_path):
  unknown = sweep.load_grid(write_grid(tmp_path, "Run('B', 'b.py', 'A', 'net_a')"))
  with pytest.raises(ValueError, match="'B' depends on 'A', which is not in the grid"):
    sweep.plan(unknown, str(tmp_path))
  cycle = sweep.load_grid(write_grid(
      tmp_path, "Run('A', 'a.py')", "Run('B', 'b.py', 'D', 'all')", "Run('C', 'c.py', 'B', 'all')",
      "Run('D', 'd.py', 'C', 'all')"))
  with pytest.raises(ValueError, match='Dependency cycle: B -> D -> C -> B'):
    sweep.plan(cycle, str(tmp_path))
  with pytest.raises(ValueError, match='Dependency cycle: A -> A'):
    sweep.ordered(sweep.load_grid(write_grid(tmp_path, "Run('A', 'a.py', 'A', 'all')")))
  with pytest.raises(ValueError, match="Two runs are named 'A'"):
    sweep.ordered(sweep.load_grid(write_grid(tmp_path, "Run('A', 'a.py')", "Run('A', 'b.py')")))


def test_table3_grid_plans_every_run_after_the_one_it_starts_from(tmp_path):
  path = os.path.join(REPO, 'experiments', 'table3.py')
  if not os.path.exists(path):
    pytest.skip('experiments/table3.py not written yet')
  plan = sweep.plan(sweep.load_grid(path), 'root')
  names = [name for name, _ in plan]
  assert len(names) == len(set(names)) and 'A_S256' in names
  for i, (name, args) in enumerate(plan):
    assert f'--workdir=root/{name}' in args
    for arg in args:
      if arg.startswith('--config.init_from=root/'):
        assert arg[len('--config.init_from=root/'):] in names[:i]


def test_sweep_dry_runs_print_the_local_tpu_and_slurm_launches(tmp_path, capsys):
  grid = write_grid(tmp_path, *CHAIN)
  root = str(tmp_path / 'root')
  finish(root, 'A_S256')
  out = run_cli(sweep, [grid, '--target=local', f'--root={root}', '--dry-run', '--',
                        '--config.seed=1'], capsys)
  lines = out.splitlines()
  assert lines[0] == 'skip A_S256 (finished)'
  assert [line.split(':')[0] for line in lines[1:]] == ['run D_S256', 'run D_S384',
                                                        'run A-LRN_S256']
  assert shlex.split(lines[1])[2:5] == [sys.executable, '-m', 'vgg_jax.main']
  assert lines[1].endswith('--config.init=paper --config.seed=1')

  out = run_cli(sweep, [grid, '--target=tpu', f'--root={root}', '--name=vgg', '--zone=z',
                        '--dry-run'], capsys)
  verbs = [shlex.split(line)[4] for line in out.splitlines() if line.startswith('gcloud')]
  assert verbs == ['create', 'ssh', 'scp', 'ssh', 'ssh', 'ssh', 'ssh', 'scp', 'delete']
  assert 'logs/D_S384.log' in out

  out = run_cli(sweep, [grid, '--target=slurm', f'--root={root}', '--nodes=2',
                        '--dry-run'], capsys)
  sbatch = [line for line in out.splitlines() if line.startswith('sbatch ')]
  assert sbatch == [
      f'sbatch --parsable {root}/D_S256/vgg_jax.sbatch',  # Its dependency is finished.
      f"sbatch --parsable '--dependency=afterok:<job id of D_S256>' {root}/D_S384/vgg_jax.sbatch",
      f'sbatch --parsable {root}/A-LRN_S256/vgg_jax.sbatch']
  assert out.count('#SBATCH --nodes=2') == 3


def test_sweep_dry_run_with_a_gcs_root_plans_every_run_without_reading_the_bucket(
    tmp_path, capsys, monkeypatch):
  def no_network(path):
    raise AssertionError(f'a dry run read {path}')

  monkeypatch.setattr(common, 'exists', no_network)
  grid = write_grid(tmp_path, *CHAIN)
  out = run_cli(sweep, [grid, '--target=tpu', '--root=gs://bucket/t3', '--dry-run'], capsys)
  lines = out.splitlines()
  assert lines[0].startswith('# Dry run: gs://bucket/t3 not read')
  assert lines[1].startswith('# Dry run without --name or --zone: NAME and ZONE stand for them')
  commands = [shlex.split(line) for line in lines[2:] if line.startswith('gcloud')]
  assert [c[4] for c in commands] == ['create', 'ssh', 'scp', 'ssh', 'ssh', 'ssh', 'ssh', 'ssh',
                                      'scp', 'delete']
  assert commands[0][5:7] == ['NAME', '--zone=ZONE'] and 'logs/A_S256.log' in out
  # A selected run may start from one not selected: it may be finished in the bucket.
  out = run_cli(sweep, [grid, '--target=tpu', '--root=gs://bucket/t3', '--name=vgg', '--zone=z',
                        '--only=D_S384', '--dry-run'], capsys)
  assert '--config.init_from=gs://bucket/t3/D_S256' in out and 'logs/D_S256.log' not in out


def test_sweep_with_an_unreachable_bucket_stops_in_one_line_naming_the_root(
    tmp_path, capsys, monkeypatch):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  asked = []

  def offline(path):  # What tf.io.gfile.exists raises without network.
    asked.append(path)
    raise tf.errors.FailedPreconditionError(
        None, None, "Error executing an HTTP request: libcurl code 6 meaning 'Could not resolve "
        "hostname', error details: Could not resolve host: www.googleapis.com\n\t when reading "
        f'metadata of {path}')

  monkeypatch.setattr(tf.io.gfile, 'exists', offline)
  grid = write_grid(tmp_path, *CHAIN)
  environ = dict(os.environ)
  with parsed_flags(grid, '--target=tpu', '--root=gs://bucket/t3', '--name=vgg',
                    '--zone=z') as remaining:
    with pytest.raises(SystemExit) as exit_info:
      sweep.main(remaining)
  assert dict(os.environ) == environ  # The GCS bounds do not reach the runs it would start.
  message = exit_info.value.code
  assert isinstance(message, str) and '\n' not in message, message  # Exit code 1, one line.
  assert message.startswith('launch.sweep: cannot look for finished runs in gs://bucket/t3 (')
  assert 'Could not resolve host: www.googleapis.com' in message and '--dry-run' in message
  assert len(asked) == 1 and not capsys.readouterr().out  # No VM was created.


# ---------------------------------------------------------------------------------------------
# Local processes, with a fake main that reports what it was given.

FAKE_MAIN = '''
import os, sys, time
print('args', *sys.argv[1:])
print('XLA_FLAGS', os.environ.get('XLA_FLAGS'))
print('[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1')
# Two of gloo's threads writing at once, as seen in a CI log: the notice split over two lines.
print('[Gloo] Rank [Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected '
      'peer ranks is : 1')
print('0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1')
if '--fail_1' in sys.argv and '--process_id=1' in sys.argv:
  print('process 1 explains its failure')
  sys.exit(4)
if '--fail' in sys.argv:
  if '--process_id=0' in sys.argv:
    sys.exit(3)
  time.sleep(60)  # A sibling waiting for the failed process in a collective.
'''


@pytest.fixture
def fake_env(tmp_path):
  (tmp_path / 'fake_main.py').write_text(textwrap.dedent(FAKE_MAIN))
  return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))


def test_local_processes_get_distributed_flags_and_their_own_devices(fake_env):
  out = io.StringIO()
  assert local.run(2, 4, ['--workdir=w'], module='fake_main', env=fake_env, out=out,
                   all_output=True) == 0
  lines = out.getvalue().splitlines()
  assert sum('[Gloo] Rank' in line for line in lines) == 4
  addresses = set()
  for i in range(2):
    args = next(l for l in lines if l.startswith(f'[{i}] args ')).split()[2:]
    assert args[0] == '--workdir=w' and args[2:] == ['--num_processes=2', f'--process_id={i}']
    assert args[1].startswith('--coordinator_address=localhost:')
    addresses.add(args[1])
    # The tests' own 8 devices (conftest) are replaced, not added to.
    assert f'[{i}] XLA_FLAGS --xla_force_host_platform_device_count=4' in lines
  assert len(addresses) == 1 and not addresses.pop().endswith(':0')


def test_local_shows_process_0_alone_without_gloo_notices_by_default(fake_env):
  out = io.StringIO()
  assert local.run(2, 1, ['--workdir=w'], module='fake_main', env=fake_env, out=out) == 0
  lines = out.getvalue().splitlines()
  assert [line.split()[:2] for line in lines] == [['[0]', 'args'], ['[0]', 'XLA_FLAGS']], lines
  # A process whose output was hidden shows its last lines when it fails.
  out = io.StringIO()
  assert local.run(2, 1, ['--fail_1'], module='fake_main', env=fake_env, out=out) == 4
  assert '[1] process 1 explains its failure' in out.getvalue()
  assert '[launch] process 1 exited with 4; stopping the others.' in out.getvalue()


def test_local_gpu_processes_get_consecutive_slices_of_the_visible_gpus():
  assert local.process_env({}, 1, 2, 'gpu')['CUDA_VISIBLE_DEVICES'] == '2,3'
  visible = {'CUDA_VISIBLE_DEVICES': '4,5,6,7'}
  assert [local.process_env(visible, i, 2, 'gpu')['CUDA_VISIBLE_DEVICES']
          for i in range(2)] == ['4,5', '6,7']
  with pytest.raises(ValueError, match='CUDA_VISIBLE_DEVICES=4,5,6,7 has 4'):
    local.process_env(visible, 2, 2, 'gpu')


def test_local_failure_stops_the_others_and_is_the_exit_code(fake_env):
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, '-m', 'launch.local', '--num_processes=2', '--module=fake_main', '--',
       '--fail'], cwd=REPO, env=fake_env, capture_output=True, text=True, timeout=50)
  assert result.returncode == 3, result.stderr
  assert time.monotonic() - start < 30  # Process 1 would sleep 60 s if it were not stopped.
  assert '[0] args --fail --coordinator_address=localhost:' in result.stdout
  assert '[launch] process 0 exited with 3; stopping the others.' in result.stdout
  assert '[1] ' not in result.stdout  # Process 1 did not fail: its output stays hidden.
