"""The reproduction in miniature (launch/reproduce.py, experiments/mini/): the pipeline end to
end in its quick mode, and the statistics its verdicts rest on. The findings themselves are in
docs/reproduction.md; these tests do not assert them."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from experiments.mini import grid
from launch import reproduce
from launch import sweep


def test_wilson_interval_matches_scipys():
  for errors, n in ((0, 40), (3, 1080), (540, 1080), (1080, 1080)):
    expected = stats.binomtest(errors, n).proportion_ci(0.95, method='wilson')
    np.testing.assert_allclose(reproduce.wilson(errors, n), (expected.low, expected.high),
                               atol=1e-6)


def test_paired_difference_is_the_mean_difference_with_its_normal_interval():
  rng = np.random.default_rng(0)
  a, b = rng.random(2000) < 0.3, rng.random(2000) < 0.2
  mean, low, high = reproduce.paired_difference(a, b)
  d = a.astype(float) - b.astype(float)
  half = stats.norm.ppf(0.975) * np.std(d, ddof=1) / np.sqrt(len(d))
  np.testing.assert_allclose((mean, low, high), (d.mean(), d.mean() - half, d.mean() + half))


@pytest.mark.parametrize('interval,expected,verdict', [
    ((-0.02, -0.03, -0.01), 'lower', 'reproduced'),
    ((0.0, -0.01, 0.01), 'lower', 'inconclusive'),
    ((0.02, 0.01, 0.03), 'lower', 'not reproduced'),
    ((0.0, -0.01, 0.01), 'not lower', 'reproduced'),
    ((-0.02, -0.03, -0.01), 'not lower', 'not reproduced'),
    (None, 'lower', 'not run'),
])
def test_verdicts_follow_the_interval(interval, expected, verdict):
  assert reproduce.verdict(interval, expected) == verdict


def test_grid_plans_every_run_after_its_source_with_matched_budgets(tmp_path):
  runs = grid.get_runs()
  names = [run.name for run in runs]
  assert len(names) == len(set(names))
  for net in grid.DEPTH_NETS:
    for seed in grid.SEEDS:
      assert grid.name(net, '36', seed) in names
  plan = sweep.plan(runs, str(tmp_path))
  position = {name: i for i, (name, _) in enumerate(plan)}
  for run in runs:
    if run.depends_on:
      assert position[run.depends_on] < position[run.name]
  assert not any('num_epochs' in flag or 'num_train_steps' in flag
                 for run in runs for flag in run.overrides)


@pytest.mark.slow
def test_quick_reproduction_trains_tests_probes_and_reports_then_resumes(tmp_path):
  """`python -m launch.reproduce --quick`: the quick grid through launch.sweep, the test
  protocols, Appendix B's SVMs, the report; run again, it redoes nothing."""
  root = tmp_path / 'mini'
  command = [sys.executable, '-m', 'launch.reproduce', f'--root={root}', '--quick', '--',
             f'--config.data_dir={tmp_path / "tfds"}']
  first = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
  for run in grid.get_runs('quick'):
    assert (root / run.name / 'eval_metrics.json').exists(), run.name
  mini = json.loads((root / 'D_S36-72_s0' / 'eval' / 'mini.json').read_text())
  assert set(mini) == {'dense@Q', 'multicrop@Q', 'dense', 'multicrop', 'dense+multicrop'}
  assert mini['dense']['scales'] == [36, 54, 72] and mini['multicrop@Q']['scales'] == [54]
  assert all(r['num_examples'] == 40 for r in mini.values())
  probes = json.loads((root / 'B_0to4' / 'linear_probe.json').read_text())
  assert len(probes) == len(reproduce.PROBES)
  assert {p['num_test'] for p in probes.values()} == {40}
  assert probes['scaled_digits/5to9:net:fc7:stack']['dimensions'] == 3 * 512
  report = (root / 'reproduction.md').read_text()
  assert '## Verdicts' in report and 'Appendix B' in report
  second = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
  assert second.returncode == 0, second.stderr[-4000:]
  assert 'skip D_S36-72_s0 (finished)' in second.stdout
  assert '+ testing' not in second.stdout and '+ Appendix B' not in second.stdout
