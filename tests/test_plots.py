"""`vgg_jax.plots` on summaries written here by clu and TensorBoard's writers, and results JSON."""

import json
import pathlib
import random
import shutil
import subprocess
import sys
import time

from clu import metric_writers
import numpy as np
from PIL import Image
import pytest
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import event_file_writer

from vgg_jax import plots

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED = random.randrange(2**32)
TRAIN_TAGS = ('loss', 'top1_error', 'top5_error', 'learning_rate', 'grad_norm', 'img_per_s')
EVAL_TAGS = ('loss', 'top1_error', 'top5_error')


def _write(writer, expected: dict, step: int, values: dict) -> None:
  """Writes `values` at `step` and records what TensorBoard stores: the float32 value."""
  writer.write_scalars(step, values)
  for tag, value in values.items():
    expected.setdefault(tag, {})[step] = np.float32(value)


def _random_values(rng, step: int) -> dict:
  values = {f'train/{t}': float(rng.uniform(0, 1)) for t in TRAIN_TAGS}
  values['train/learning_rate'] = float(10 ** rng.uniform(-5, -2))
  if step % 20 == 0:
    values.update({f'eval/{t}': float(rng.uniform(0, 1)) for t in EVAL_TAGS})
  return values


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir whose run was preempted after step 50 and resumed from step 30: the second event
  file repeats steps 40 and 50 with new values. A third file holds legacy simple values.
  Returns the workdir and {tag: {step: value}}, the last write per step."""
  rng = np.random.default_rng(SEED)
  root = tmp_path_factory.mktemp('workdir')
  expected = {}
  first = metric_writers.SummaryWriter(str(root / 'tensorboard'))
  first.write_hparams({'variant': 'D', 'batch_size': 256})
  for step in range(10, 60, 10):
    _write(first, expected, step, _random_values(rng, step))
  first.close()
  time.sleep(0.01)
  second = metric_writers.SummaryWriter(str(root / 'tensorboard'))
  for step in range(40, 80, 10):
    _write(second, expected, step, _random_values(rng, step))
  _write(second, expected, 70, {f'test/{p}/top{k}_error': float(rng.uniform(0, 1))
                                for p in ('single', 'dense') for k in (1, 5)})
  second.close()
  legacy = event_file_writer.EventFileWriter(str(root / 'tensorboard'))
  value = float(rng.uniform(0, 1))
  legacy.add_event(event_pb2.Event(step=80, wall_time=time.time(), summary=summary_pb2.Summary(
      value=[summary_pb2.Summary.Value(tag='train/loss', simple_value=value)])))
  legacy.close()
  expected['train/loss'][80] = np.float32(value)
  assert len(list((root / 'tensorboard').glob('events.out.tfevents.*'))) == 3
  return root, expected


def test_read_scalars_returns_the_last_write_per_step_sorted_by_step(workdir):
  root, expected = workdir
  scalars = plots.read_scalars(str(root))
  assert sorted(scalars) == sorted(expected)
  for tag, by_step in expected.items():
    steps, values = scalars[tag]
    np.testing.assert_array_equal(steps, sorted(by_step), err_msg=f'{tag}, seed {SEED}')
    np.testing.assert_array_equal(values, [by_step[s] for s in sorted(by_step)],
                                  err_msg=f'{tag}, seed {SEED}')
  assert list(scalars['train/loss'][0]) == [10, 20, 30, 40, 50, 60, 70, 80]


def test_read_scalars_without_summaries_says_to_train_first(tmp_path):
  with pytest.raises(FileNotFoundError, match='train first: python -m vgg_jax.main'):
    plots.read_scalars(str(tmp_path))
  (tmp_path / 'tensorboard').mkdir()
  with pytest.raises(FileNotFoundError, match='No scalar summaries.*train first'):
    plots.read_scalars(str(tmp_path))


def _assert_png(path) -> None:
  with Image.open(path) as image:
    assert image.format == 'PNG' and image.width > 200 and image.height > 100
    pixels = np.asarray(image.convert('L'))
  assert pixels.std() > 0, f'{path} is blank'


def test_plot_curves_draws_the_scalars(workdir, tmp_path, monkeypatch):
  root, expected = workdir
  drawn, save = {}, plots._save

  def record(fig, path):
    ax = fig.axes[0]
    drawn[path.name] = (ax.get_yscale(), {line.get_label(): (line.get_xdata(), line.get_ydata())
                                          for line in ax.get_lines()})
    return save(fig, path)

  monkeypatch.setattr(plots, '_save', record)
  paths = plots.plot_curves(plots.read_scalars(str(root)), str(tmp_path / 'out'))
  assert paths == [str(tmp_path / 'out' / n)
                   for n in ('loss.png', 'error.png', 'learning_rate.png')]
  for path in paths:
    _assert_png(path)

  def series(tag, scale=1.0):
    return sorted(expected[tag]), [scale * expected[tag][s] for s in sorted(expected[tag])]

  scale, lines = drawn['error.png']
  assert scale == 'symlog' and len(lines) == 8
  for label, tag in [('train top-5', 'train/top5_error'), ('eval top-1', 'eval/top1_error'),
                     ('test dense top-5', 'test/dense/top5_error')]:
    np.testing.assert_allclose(np.array(lines[label]), series(tag, 100.0), rtol=1e-6)
  scale, lines = drawn['learning_rate.png']
  assert scale == 'log'
  np.testing.assert_allclose(np.array(lines['train']), series('train/learning_rate'), rtol=1e-6)
  np.testing.assert_allclose(np.array(drawn['loss.png'][1]['eval']), series('eval/loss'),
                             rtol=1e-6)


def test_error_plot_adds_results_json_protocols_on_a_readable_scale_with_final_values(
    workdir, tmp_path, monkeypatch):
  """An evaluation run after training (eval/results.json) shows on error.png; TensorBoard's own
  points win where both have a step; the final values are written on the plot."""
  root, expected = workdir
  run = tmp_path / 'run'
  shutil.copytree(root / 'tensorboard', run / 'tensorboard')
  (run / 'eval').mkdir()
  (run / 'eval' / 'results.json').write_text(json.dumps({
      'single': {'step': 70, 'top1_error': 0.5, 'top5_error': 0.25},
      'multicrop': {'step': 80, 'top1_error': 0.03, 'top5_error': 0.0},
      'fused:dense': {'step': [80, 80], 'top1_error': 0.02, 'top5_error': 0.0}}))
  scalars = plots.workdir_scalars(str(run))
  assert list(scalars['test/single/top1_error'][0]) == [70]
  assert scalars['test/single/top1_error'][1] == pytest.approx(
      [expected['test/single/top1_error'][70]])
  assert [list(a) for a in scalars['test/multicrop/top1_error']] == [[80], [0.03]]
  assert not [tag for tag in scalars if 'fused' in tag]

  drawn, save = {}, plots._save

  def record(fig, path):
    ax = fig.axes[0]
    drawn[path.name] = (ax.get_yscale(), {l.get_label(): list(l.get_ydata()) for l in ax.get_lines()},
                        [t.get_text() for t in ax.texts])
    return save(fig, path)

  monkeypatch.setattr(plots, '_save', record)
  plots.plot_curves(scalars, str(tmp_path / 'out'))
  scale, lines, texts = drawn['error.png']
  assert scale == 'symlog'
  assert lines['test multicrop top-1'] == pytest.approx([3.0])
  assert lines['test multicrop top-5'] == pytest.approx([0.0])
  final = 100 * expected['eval/top1_error'][max(expected['eval/top1_error'])]
  assert {'3.00%', '0.00%', f'{final:.2f}%'} <= set(texts), texts


def test_plot_curves_skips_figures_without_data(tmp_path):
  scalars = {'train/learning_rate': (np.array([1, 2]), np.array([0.01, 0.001]))}
  assert plots.plot_curves(scalars, str(tmp_path)) == [str(tmp_path / 'learning_rate.png')]


RESULTS = {'validation': {
    'fused:dense': {'net': 'D+E', 'train_scale': '[256, 512], [256, 512]', 'step': [9, 9],
                    'scales': [256, 384, 512], 'top1_error': 0.23951, 'top5_error': 0.07104,
                    'paper': [24.0, 7.1]},
    'single': {'net': 'D', 'train_scale': '256', 'scales': [256], 'top1_error': 0.27431,
               'top5_error': 0.08906, 'paper': [27.0, 8.8], 'step': 9},
}, 'test': {
    'dense': {'net': 'D x0.125', 'train_scale': '[32, 36]', 'scales': [32, 34, 36],
              'top1_error': 0.8055555555555556, 'top5_error': 0.17500000000000004,
              'paper': None, 'step': 880},
}}


def test_eval_table_from_results_json_one_row_per_protocol_by_split_and_step_fused_last(
    tmp_path):
  (tmp_path / 'eval').mkdir()
  (tmp_path / 'eval' / 'results.json').write_text(json.dumps(RESULTS))
  (tmp_path / 'eval_metrics.json').write_text(json.dumps(
      {'step': 5, 'top1_error': 0.5, 'top5_error': 0.25, 'num_examples': 10}))
  lines = plots.eval_table(str(tmp_path)).splitlines()
  assert lines[2] == ('| protocol | split | checkpoint step | ConvNet | train S | test Q | '
                      'top-1 err. (%) | top-5 err. (%) | paper top-1 / top-5 (%) |')
  assert lines[4:] == [
      '| dense | test | 880 | D x0.125 | [32, 36] | 32, 34, 36 | 80.56 | 17.50 | — |',
      '| single | validation | 9 | D | 256 | 256 | 27.43 | 8.91 | 27.0 / 8.8 |',
      '| fused:dense | validation | 9, 9 | D+E | [256, 512], [256, 512] | 256, 384, 512 | '
      '23.95 | 7.10 | 24.0 / 7.1 |']
  paths = plots.write_table(str(tmp_path), str(tmp_path / 'out'))
  assert paths == [str(tmp_path / 'out' / n) for n in ('eval_table.md', 'eval_table.png')]
  assert pathlib.Path(paths[0]).read_text() == plots.eval_table(str(tmp_path))
  _assert_png(paths[1])


def test_eval_table_from_eval_metrics_json_without_results(tmp_path):
  (tmp_path / 'eval_metrics.json').write_text(json.dumps(
      {'step': 880, 'top1_error': 0.019444444444444445, 'top5_error': 0.0, 'num_examples': 360}))
  lines = plots.eval_table(str(tmp_path)).splitlines()
  assert lines[2:] == ['| step | examples | top-1 err. (%) | top-5 err. (%) |',
                       '|---|---|---|---|', '| 880 | 360 | 1.94 | 0.00 |']
  (tmp_path / 'eval_metrics.json').unlink()
  with pytest.raises(FileNotFoundError, match='vgg_jax.evaluate'):
    plots.eval_table(str(tmp_path))


def test_command_line_writes_plots_and_table_or_says_to_train_first(workdir, tmp_path):
  root, _ = workdir
  (root / 'eval').mkdir(exist_ok=True)
  (root / 'eval' / 'results.json').write_text(json.dumps(RESULTS))
  commands = [[f'--workdir={root}'], [f'--workdir={tmp_path}']]
  runs = [subprocess.Popen([sys.executable, '-m', 'vgg_jax.plots', *args], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for args in commands]
  (out, err), (_, missing_err) = [run.communicate(timeout=120) for run in runs]
  assert runs[0].returncode == 0, err
  names = ('loss.png', 'error.png', 'learning_rate.png', 'eval_table.md', 'eval_table.png')
  assert out.split() == [str(root / 'plots' / n) for n in names]
  for name in names[:3] + names[4:]:
    _assert_png(root / 'plots' / name)
  assert '| single | validation | 9 | D | 256 | 256 | 27.43 | 8.91 | 27.0 / 8.8 |' in (
      root / 'plots' / 'eval_table.md').read_text()
  assert runs[1].returncode == 1
  assert (f'vgg_jax.plots: No TensorBoard summaries: {tmp_path}/tensorboard does not exist; '
          f'train first: python -m vgg_jax.main --config=CONFIG --workdir={tmp_path}'
          in missing_err)
