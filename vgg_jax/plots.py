"""Training curves and the evaluation table of a workdir, as PNGs to look at or put in a report.

  python -m vgg_jax.plots --workdir=DIR [--output=DIR/plots]

reads the TensorBoard summaries in DIR/tensorboard and writes to the output directory
loss.png (train and eval loss), error.png (train and eval top-1 / top-5 error in %, the test
protocols' errors as points), learning_rate.png (log scale: each division by 10 is one step),
and eval_table.md / eval_table.png: DIR/eval/results.json, the paper's test protocols with its
numbers beside ours, or else DIR/eval_metrics.json, the held-out error at the end of training.

Summaries are read with TensorBoard's own EventAccumulator rather than by hand or per file with
tf.compat.v1.train.summary_iterator: it reads a directory's event files in order, locally or on
gs://, and parses both clu's tensor-valued scalars and legacy simple values. Its orphan purging
is off and every event kept; for each step the latest write (by wall time) wins, so the steps a
resumed run repeats replace those of the run it resumed. Figures are drawn on matplotlib
Figures, without pyplot, and saved by its Agg renderer: headless, no global backend changed.
"""

import io
import json
import logging as std_logging
import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
from matplotlib import figure
import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from vgg_jax import checkpoints
from vgg_jax import cli
from vgg_jax import report

FLAGS = flags.FLAGS



def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{tag: (steps, values)} of WORKDIR/tensorboard, sorted by step, the last write per step."""
  directory = os.path.join(workdir, 'tensorboard')
  train_first = f'train first: python -m vgg_jax.main --config=CONFIG --workdir={workdir}'
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f'No TensorBoard summaries: {directory} does not exist; '
                            f'{train_first}')
  accumulator = event_accumulator.EventAccumulator(
      directory, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0},
      purge_orphaned_data=False).Reload()
  tags = accumulator.Tags()
  events = {tag: [(e.wall_time, e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in tags[event_accumulator.SCALARS]}
  for tag in tags[event_accumulator.TENSORS]:
    if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == 'scalars':
      events.setdefault(tag, []).extend(
          (e.wall_time, e.step, tensor_util.make_ndarray(e.tensor_proto).item())
          for e in accumulator.Tensors(tag))
  if not events:
    raise FileNotFoundError(f'No scalar summaries in {directory}; {train_first}')
  scalars = {}
  for tag, rows in sorted(events.items()):
    latest = sorted({step: value for _, step, value in sorted(rows, key=lambda r: r[0])}.items())
    scalars[tag] = (np.array([s for s, _ in latest], np.int64),
                    np.array([v for _, v in latest], np.float64))
  return scalars


def results_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The test protocols' errors of WORKDIR/eval/results.json (what `python -m vgg_jax.evaluate`
  wrote) on the split training tests (`training_split`), as one-point series
  test/PROTOCOL/top{1,5}_error at their checkpoint's step; {} if there are none. Fused entries
  span several runs' steps and other splits are not what TensorBoard's test/ series hold:
  both are left to the table."""
  merged = report.read(workdir)
  split = training_split(workdir, merged)
  scalars = {}
  for name, r in merged.get(split, {}).items():
    if name.startswith('fused:'):
      continue
    for k in (1, 5):
      scalars[f'test/{name}/top{k}_error'] = (np.array([r['step']]),
                                              np.array([r[f'top{k}_error']]))
  return scalars


def training_split(workdir: str, merged: dict):
  """The split the run's own evaluations read (its config's eval_split); without a checkpoint,
  the one split of results.json, if it has one."""
  saved = checkpoints.saved_config(workdir)
  if saved is not None:
    return saved[1].eval_split
  return next(iter(merged)) if len(merged) == 1 else None


def workdir_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`read_scalars`, plus the points of eval/results.json that TensorBoard lacks (an
  evaluation run after training, rather than during it)."""
  scalars = read_scalars(workdir)
  for tag, (steps, values) in results_scalars(workdir).items():
    have_steps, have_values = scalars.get(tag, (np.array([], np.int64), np.array([])))
    new = ~np.isin(steps, have_steps)
    order = np.argsort(np.concatenate([have_steps, steps[new]]), kind='stable')
    scalars[tag] = (np.concatenate([have_steps, steps[new]])[order],
                    np.concatenate([have_values, values[new]])[order])
  return scalars


def _save(fig, path: epath.Path) -> str:
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120, bbox_inches='tight')
  path.write_bytes(buffer.getvalue())
  return str(path)


def plot_curves(scalars: dict, output_dir: str) -> list[str]:
  """Writes loss.png, error.png and learning_rate.png (those with data); returns their paths."""
  protocols = sorted({t.split('/')[1] for t in scalars if t.startswith('test/')})
  color = {1: 'C0', 5: 'C3'}
  figures = {
      'loss.png': ('Loss', 'cross-entropy loss', [
          ('train/loss', 'train', {}), ('eval/loss', 'eval', {'marker': 'o', 'ls': '--'})]),
      'error.png': ('Top-1 / top-5 error (final values marked)', 'error (%), log above 1%', [
          *((f'train/top{k}_error', f'train top-{k}', {'color': color[k], 'alpha': 0.6})
            for k in (1, 5)),
          *((f'eval/top{k}_error', f'eval top-{k}', {'color': color[k], 'marker': 'o',
                                                      'ls': '--'}) for k in (1, 5)),
          *((f'test/{p}/top{k}_error', f'test {p} top-{k}',
             {'color': color[k], 'marker': '*PXDs'[i % 5], 'markersize': 10, 'ls': 'none'})
            for i, p in enumerate(protocols) for k in (1, 5))]),
      'learning_rate.png': ('Learning rate in force (divided when validation error stalls)',
                            'learning rate',
                            [('train/learning_rate', 'train', {'drawstyle': 'steps-post'})]),
  }
  output = epath.Path(output_dir)
  output.mkdir(parents=True, exist_ok=True)
  paths = []
  for name, (title, ylabel, lines) in figures.items():
    lines = [line for line in lines if line[0] in scalars]
    if not lines:
      continue
    fig = figure.Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for tag, label, style in lines:
      steps, values = scalars[tag]
      values = 100 * values if name == 'error.png' else values
      (line,) = ax.plot(steps, values, label=label, **style)
      if name == 'error.png':  # The final errors, readable whatever the axis.
        ax.annotate(f'{values[-1]:.2f}%', (steps[-1], values[-1]), textcoords='offset points',
                    xytext=(4, 2), fontsize=7, color=line.get_color())
    if name == 'error.png':
      # Linear below 1%, logarithmic above: chance (90%) and a final 2% both read.
      ax.set_yscale('symlog', linthresh=1.0)
      ax.set_ylim(bottom=0)
    if name == 'learning_rate.png' and (scalars['train/learning_rate'][1] > 0).any():
      ax.set_yscale('log')
    ax.set(title=title, xlabel='step', ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    paths.append(_save(fig, output / name))
  return paths


def compare_runs(runs: dict[str, Sequence[str]], tag: str, path: str, title: str,
                 ylabel: str, percent: bool = False, log: bool = False) -> str:
  """One summary `tag` of several runs in one figure, e.g. the training loss of nets under
  different initialisations. `runs` maps a label to its workdirs (seeds of one setting): their
  mean is drawn, with their range shaded when there are several. Returns the PNG's path."""
  fig = figure.Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for i, (label, workdirs) in enumerate(runs.items()):
    curves = [read_scalars(w)[tag] for w in workdirs]
    length = min(len(steps) for steps, _ in curves)
    steps = curves[0][0][:length]
    values = np.stack([v[:length] for _, v in curves]) * (100 if percent else 1)
    ax.plot(steps, values.mean(axis=0), color=f'C{i}',
            label=label + (f' ({len(workdirs)} seeds)' if len(workdirs) > 1 else ''))
    if len(workdirs) > 1:
      ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=f'C{i}', alpha=0.2)
  if log:
    ax.set_yscale('log')
  ax.set(title=title, xlabel='step', ylabel=ylabel)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  output = epath.Path(path)
  output.parent.mkdir(parents=True, exist_ok=True)
  return _save(fig, output)


def _table(workdir: str) -> tuple[str, list[str], list[list[str]]]:
  """(title, header, rows): eval/results.json's protocols, or else eval_metrics.json."""
  results, final = (epath.Path(workdir) / 'eval' / 'results.json',
                    epath.Path(workdir) / 'eval_metrics.json')
  if results.exists():
    rows = [[name, split, report.step_text(r['step']), r['net'], str(r['train_scale']),
             ', '.join(map(str, r['scales'])), report.percent(r['top1_error']),
             report.percent(r['top5_error']),
             '—' if r.get('paper') is None else f'{r["paper"][0]:.1f} / {r["paper"][1]:.1f}']
            for split, entries in report.sections(report.read(workdir))
            for name, r in sorted(entries.items(), key=lambda e: e[0].startswith('fused:'))]
    return (f'Test protocols of {workdir} (eval/results.json)',
            ['protocol', 'split', 'checkpoint step', 'ConvNet', 'train S', 'test Q',
             'top-1 err. (%)', 'top-5 err. (%)', 'paper top-1 / top-5 (%)'], rows)
  if final.exists():
    m = json.loads(final.read_text())
    return (f'Held-out error at the end of training of {workdir} (eval_metrics.json)',
            ['step', 'examples', 'top-1 err. (%)', 'top-5 err. (%)'],
            [[str(m['step']), str(m['num_examples']), report.percent(m['top1_error']),
              report.percent(m['top5_error'])]])
  raise FileNotFoundError(f'Neither {results} nor {final}: finish training (python -m '
                          f'vgg_jax.main) or evaluate (python -m vgg_jax.evaluate) first.')


def eval_table(workdir: str) -> str:
  """The evaluation results as markdown, errors in % with two decimals, paper numbers with one."""
  title, header, rows = _table(workdir)
  return '\n'.join([f'## {title}', '', *report.markdown_table(header, rows)]) + '\n'


def write_table(workdir: str, output_dir: str) -> list[str]:
  """Writes eval_table.md and eval_table.png (matplotlib's table); returns their paths."""
  title, header, rows = _table(workdir)
  output = epath.Path(output_dir)
  output.mkdir(parents=True, exist_ok=True)
  (output / 'eval_table.md').write_text(eval_table(workdir))
  fig = figure.Figure(figsize=(1.6 * len(header), 0.5 * (len(rows) + 2)))
  ax = fig.subplots()
  ax.axis('off')
  table = ax.table(cellText=rows, colLabels=header, loc='center', cellLoc='center')
  table.auto_set_font_size(False)
  table.set_fontsize(9)
  table.auto_set_column_width(range(len(header)))
  table.scale(1, 1.4)
  ax.set_title(title, fontsize=10)
  return [str(output / 'eval_table.md'), _save(fig, output / 'eval_table.png')]


def define_flags() -> None:
  """The CLI's flags, defined when it runs, not when the module is imported."""
  flags.DEFINE_string('workdir', None, 'Training workdir whose summaries and results are plotted.')
  flags.DEFINE_string('output', None, 'Directory for the PNGs and eval_table.md; default: '
                      'WORKDIR/plots.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  cli.setup()
  std_logging.getLogger('tensorboard').setLevel(std_logging.WARNING)
  output = FLAGS.output or os.path.join(FLAGS.workdir, 'plots')
  try:
    paths = plot_curves(workdir_scalars(FLAGS.workdir), output)
  except FileNotFoundError as e:
    sys.exit(f'vgg_jax.plots: {e}')
  try:
    paths += write_table(FLAGS.workdir, output)
  except FileNotFoundError as e:
    logging.warning('No evaluation table: %s', e)
  print('\n'.join(paths))


if __name__ == '__main__':
  define_flags()
  # Here, not at import: importing this module must not make its flags required elsewhere.
  flags.mark_flags_as_required(['workdir'])
  cli.run(main)
