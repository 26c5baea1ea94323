"""The benchmarks run, in seconds-long smoke mode, so they never rot."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eval_cost_smoke_run_reports_both_methods(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = tmp_path / 'eval_cost.json'
  result = subprocess.run([sys.executable, '-m', 'benchmarks.eval_cost', '--smoke',
                           f'--json={out}'], cwd=REPO, env=env, capture_output=True, text=True,
                          check=False, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out) as f:
    report = json.load(f)
  assert set(report['results']) == {'dense', 'multicrop'}
  assert report['results']['dense']['views_per_image'] == 2
  assert report['results']['multicrop']['views_per_image'] == 50
  for method in report['results'].values():
    assert method['ms_per_image'] > 0 and method['images_per_s'] > 0
  # 25 overlapping crops, twice, do more arithmetic than one 48x64 image, twice.
  assert report['multicrop_over_dense_flops'] > 1
  assert 'multicrop / dense' in result.stdout
