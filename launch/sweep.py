"""Runs a grid of experiments (Table 3) in dependency order, each in ROOT/NAME.

  python -m launch.sweep experiments/table3.py --target=local --root=workdirs/table3 -- \
    --config.data_dir=/data/tensorflow_datasets --config.manual_dir=/data/ilsvrc2012

The grid file defines `get_runs()`: runs with a name, a config ('experiments/configD.py:S=384'),
the run they start from (`depends_on`, with `init_mode`) and extra main flags (`overrides`).
A run's main flags are its config, `--workdir=ROOT/NAME`, `--config.init_from=ROOT/DEPENDENCY
--config.init_mode=MODE`, its overrides, then the flags after `--` (so those win). Runs whose
workdir holds eval_metrics.json are finished and skipped, so rerunning the sweep picks up where
it stopped (an interrupted run resumes from its checkpoint). --dry-run prints the plan; with a
gs:// root it needs no network: the bucket is not read, so finished runs are listed too.
  --target=local  one run after another, `python -m vgg_jax.main`, or through launch.local
                  when --num_processes is given; stops at the first failure.
  --target=tpu    one TPU VM (launch.tpu flags) created once, the runs one after another, logs
                  copied back, VM deleted.
  --target=slurm  one sbatch job per run (launch.slurm flags), each waiting for its
                  dependency's job (--dependency=afterok).
--only=NAME,... runs a subset; their dependencies must be selected too or finished.
"""

import os
import subprocess
import sys
from typing import Any, Callable, Optional, Sequence, Union

from absl import app
from absl import flags

from launch import common
from launch import local
from launch import slurm
from launch import tpu
from vgg_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_enum('target', 'local', ['local', 'tpu', 'slurm'], 'Where the runs go.')
flags.DEFINE_string('root', None, 'Parent of the runs\' workdirs (required); gs:// for tpu.')
flags.DEFINE_list('only', None, 'Run only these (comma-separated names).')

SKIP = 'skip'
Plan = list[tuple[str, Union[list[str], str]]]


def load_grid(grid: str) -> list[Any]:
  """`get_runs()` of the grid file at `grid`, imported by path (it need not be a package);
  'FILE:ARG' calls `get_runs(ARG)`, as config files take an argument."""
  path, _, arg = grid.partition(':')
  try:
    module = cli.load_file(path)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  return list(module.get_runs(arg) if arg else module.get_runs())


def ordered(runs: Sequence[Any]) -> list[Any]:
  """The runs with every dependency before its dependents, otherwise in grid order.

  Raises ValueError on a repeated name, an unknown dependency or a cycle.
  """
  by_name = {}
  for run in runs:
    if run.name in by_name:
      raise ValueError(f'Two runs are named {run.name!r}.')
    by_name[run.name] = run
  for run in runs:
    if run.depends_on is not None and run.depends_on not in by_name:
      raise ValueError(f'Run {run.name!r} depends on {run.depends_on!r}, which is not in the '
                       f'grid ({", ".join(by_name)}).')
  order, placed = [], set()
  for run in runs:
    chain = []  # run, its dependency, theirs, ... up to one already placed.
    while run is not None and run.name not in placed:
      if run in chain:
        cycle = [r.name for r in chain[chain.index(run):]] + [run.name]
        raise ValueError(f'Dependency cycle: {" -> ".join(cycle)} (each starts from the next).')
      chain.append(run)
      run = by_name.get(run.depends_on)
    for r in reversed(chain):
      order.append(r)
      placed.add(r.name)
  return order


def workdir(root: str, name: str) -> str:
  return os.path.join(root, name)


def finished(path: str) -> bool:
  return common.exists(os.path.join(path, 'eval_metrics.json'))


def not_checked(path: str) -> None:
  """A dry run's answer for a gs:// workdir: not asked, so that planning needs no network."""
  del path


def main_args(run: Any, root: str, extra: Sequence[str] = ()) -> list[str]:
  """vgg_jax.main's flags for `run`."""
  args = [f'--config={run.config}', f'--workdir={workdir(root, run.name)}']
  if run.depends_on is not None:
    args.append(f'--config.init_from={workdir(root, run.depends_on)}')
    if run.init_mode is not None:
      args.append(f'--config.init_mode={run.init_mode}')
  return args + list(run.overrides) + list(extra)


def plan(grid_runs: Sequence[Any], root: str, extra: Sequence[str] = (),
         only: Optional[Sequence[str]] = None,
         is_finished: Callable[[str], Optional[bool]] = finished) -> Plan:
  """(name, main flags or 'skip') in the order to run them.

  `is_finished` may answer None (not known): such a run is planned, and may be what a selected
  run starts from. Raises ValueError if a selected run would start from a run that is neither
  finished (or not known) nor selected.
  """
  runs = ordered(grid_runs)
  names = [run.name for run in runs]
  unknown = [name for name in only or () if name not in names]
  if unknown:
    raise ValueError(f'--only names {", ".join(unknown)}, not in the grid ({", ".join(names)}).')
  selected = set(only or names)
  done = {name: is_finished(workdir(root, name)) for name in names}
  result = []
  for run in runs:
    if run.name not in selected:
      continue
    dependency = run.depends_on
    if (dependency is not None and dependency not in selected and done[dependency] is not None
        and not done[dependency]):
      raise ValueError(f'Run {run.name!r} starts from {dependency!r}, which is neither '
                       f'finished ({workdir(root, dependency)}/eval_metrics.json) nor selected.')
    result.append((run.name, SKIP if done[run.name] else main_args(run, root, extra)))
  return result


def run_local(todo: Plan, dry_run: bool) -> int:
  """One run after another on this machine; the first failure's exit code."""
  processes = FLAGS.num_processes if FLAGS['num_processes'].present else 1
  for name, args in todo:
    if processes > 1:
      command = [sys.executable, '-m', 'launch.local', f'--num_processes={processes}',
                 f'--devices_per_process={FLAGS.devices_per_process}',
                 f'--platform={FLAGS.platform}', '--', *args]
    else:
      command = [sys.executable, '-m', 'vgg_jax.main', *args]
    print(f'run {name}:', common.shell(command), flush=True)
    if dry_run:
      continue
    if processes > 1:
      code = local.run(processes, FLAGS.devices_per_process, args, port=FLAGS.port,
                       platform=FLAGS.platform)
    else:
      code = subprocess.run(command, check=False).returncode
    if code:
      print(f'{name} failed (exit code {code}); stopping the sweep.', flush=True)
      return code
  return 0


def run_tpu(todo: Plan, dry_run: bool) -> int:
  """One VM for all runs, created, used one run after another, deleted."""
  if not todo:
    return 0
  steps = tpu.steps_from_flags(todo)
  if dry_run:
    for _, command in steps:
      print(common.shell(command))
    return 0
  return tpu.execute(steps)


def run_slurm(todo: Plan, dependencies: dict[str, Optional[str]], dry_run: bool) -> int:
  """One sbatch job per run; a run's job waits for its dependency's job (afterok)."""
  jobs = {}
  for name, args in todo:
    script_dir = FLAGS.script_dir and os.path.join(FLAGS.script_dir, name)
    path = slurm.script_path(args, script_dir, FLAGS.job_name)
    text = slurm.script_from_flags(args, os.path.dirname(path))
    after = jobs.get(dependencies[name])  # None: no dependency, or it is finished.
    if dry_run:
      print(f'# {name}: {path}')
      print(text)
      print(common.shell(slurm.sbatch_command(path, after)), end='\n\n')
      jobs[name] = f'<job id of {name}>'
    else:
      jobs[name] = slurm.submit(path, text, after)
  return 0


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('Usage: python -m launch.sweep GRID.py --target=local --root=DIR '
                         '[-- extra vgg_jax.main flags]')
  if not FLAGS.root:
    raise app.UsageError('--root is required: each run goes to ROOT/NAME.')
  grid, extra = argv[1], argv[2:]
  offline = FLAGS.dry_run and common.is_remote(FLAGS.root)
  try:
    runs = load_grid(grid)
    todo = plan(runs, FLAGS.root, extra, FLAGS.only, not_checked if offline else finished)
  except ValueError as e:
    raise app.UsageError(f'{grid}: {e}') from e
  except common.Unreachable as e:
    sys.exit(f'launch.sweep: cannot look for finished runs in {FLAGS.root} ({e}); check the '
             'network and the credentials (gcloud auth application-default login), or plan '
             'offline with --dry-run.')
  if offline:
    print(f'# Dry run: {FLAGS.root} not read (no network needed), so runs finished there are '
          'listed too; the sweep itself skips them.', flush=True)
  for name, args in todo:
    if args == SKIP:
      print(f'skip {name} (finished)', flush=True)
  todo = [(name, args) for name, args in todo if args != SKIP]
  if FLAGS.target == 'local':
    code = run_local(todo, FLAGS.dry_run)
  elif FLAGS.target == 'tpu':
    code = run_tpu(todo, FLAGS.dry_run)
  else:
    code = run_slurm(todo, {run.name: run.depends_on for run in runs}, FLAGS.dry_run)
  sys.exit(code)


if __name__ == '__main__':
  app.run(main)
