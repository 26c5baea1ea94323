"""The benchmarks run, in seconds-long smoke mode, so they never rot."""

import json
import os
import subprocess
import sys

import pytest

from vgg_jax import winograd

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


def run_benchmark(module: str, tmp_path, *args) -> tuple[dict, str]:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = tmp_path / f'{module}.json'
  result = subprocess.run([sys.executable, '-m', f'benchmarks.{module}', '--smoke',
                           f'--json={out}', *args], cwd=REPO, env=env, capture_output=True,
                          text=True, check=False, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out) as f:
    return json.load(f), result.stdout


def test_train_step_smoke_run_reports_throughput_flops_and_the_loop_ablations(tmp_path):
  # At 1/8 width (the torch side, full-width only, is left out) to keep CI fast.
  report, stdout = run_benchmark('train_step', tmp_path, '--ablations', '--width=0.125')
  (row,) = report['results']
  assert row['variant'] == 'A' and row['dtype'] == 'float32'
  # 6 x the multiply-adds of net A at 1/8 width, 32x32, 10 classes, counted by hand from
  # Table 1: 8-64 conv channels, 512-wide fc6 / fc7.
  convs = [(3, 8, 32), (8, 16, 16), (16, 32, 8), (32, 32, 8), (32, 64, 4), (64, 64, 4),
           (64, 64, 2), (64, 64, 2)]
  macs = sum(9 * cin * cout * size * size for cin, cout, size in convs)
  macs += 64 * 512 + 512 * 512 + 512 * 10
  assert row['train_flops_per_image'] == 6 * macs
  assert row['jax']['images_per_s'] > 0 and len(row['jax']['step_times_s']) == 2
  assert row['jax']['images_per_s'] == row['jax']['images_per_step'] / row['jax']['median_step_s']
  ablations = row['ablations']
  for name in ('train.py loop', 'metrics pulled every step',
               'non-finite flag read only with the metrics', 'no prefetch to device',
               'float32 transfer', 'no donation', 'kernel gradient as XLA convolution'):
    assert ablations[name]['images_per_s'] > 0, name
  assert ablations['batch_bytes']['float32'] == 4 * ablations['batch_bytes']['uint8']
  assert 'jax img/s' in stdout


def test_conv_grads_smoke_run_checks_and_times_every_layer(tmp_path):
  report, _ = run_benchmark('conv_grads', tmp_path)
  layers = [r['layer'] for r in report['results']]
  # Net A: 8 convolutions, 5 pools.
  assert sum(name.startswith('conv') for name in layers) == 8
  assert sum(name.startswith('pool') for name in layers) == 5
  assert all(r['xla_s'] > 0 and r['vgg_jax_s'] > 0 for r in report['results'])


def test_input_pipeline_smoke_run_compares_decode_crop_and_pil_per_core(tmp_path):
  report, stdout = run_benchmark('input_pipeline', tmp_path)
  assert {r['scale'] for r in report['results']} == {'S=256', 'S=256-512'}
  for r in report['results']:
    assert r['tf_whole_per_core'] > 0 and r['tf_decode_crop_per_core'] > 0
    assert r['pil_per_core'] > 0
  assert 'decode_crop/PIL' in stdout


def test_resume_cost_smoke_run_times_both_readers_at_step_0_and_resumed(tmp_path):
  report, stdout = run_benchmark('resume_cost', tmp_path, f'--root={tmp_path}')
  assert report['records'] == 512 and report['resume_step'] == int(0.9 * 512 // 32)
  assert set(report['results']) == {'random access (vgg_jax)', 'sequential + skip (before)'}
  for reader in report['results'].values():
    assert min(reader['first_batch_step0_s'] + reader['first_batch_resumed_s']) > 0
    assert min(reader['img_per_s']) > 0
  assert 'resumed / step 0' in stdout


def test_inference_smoke_run_times_features_and_predict(tmp_path):
  report, stdout = run_benchmark('inference', tmp_path)
  (row,) = report['rows']
  assert (row['variant'], row['image_size'], row['batch']) == ('A', 32, 1)
  for name in ('vgg_jax features', 'vgg_jax predict (dense)'):
    assert row[name]['images_per_s'] > 0 and len(row[name]['step_times_s']) == 2
  assert 'vgg_jax features' in stdout


def test_winograd_smoke_run_checks_both_tile_sizes_against_xla_on_every_layer(tmp_path):
  report, stdout = run_benchmark('winograd', tmp_path)
  assert [r['layer'] for r in report['results']] == [
      'conv1_1', 'conv2_1', 'conv3_1', 'conv3_2', 'conv4_1', 'conv4_2', 'conv5_1', 'conv5_2']
  for r in report['results']:
    # F(4x4)'s transforms have larger constants than F(2x2)'s, hence more float32 rounding.
    assert r['error']['F(2x2,3x3)'] < 1e-5 and r['error']['F(4x4,3x3)'] < 1e-4, r
    assert min(r['ms'].values()) > 0
  assert 'err F(4x4)' in stdout


@pytest.mark.skipif(not winograd.available(), reason='no C++ compiler for the Winograd kernels')
def test_conv_algorithms_smoke_run_checks_winograd_against_xla_on_every_layer(tmp_path):
  report, stdout = run_benchmark('conv_algorithms', tmp_path)
  assert [r['layer'] for r in report['rows']] == [
      'conv1_1', 'conv2_1', 'conv3_1', 'conv3_2', 'conv4_1', 'conv4_2', 'conv5_1', 'conv5_2']
  for r in report['rows']:
    assert set(r['error']) == {'y', 'dx', 'dkernel'}
    assert max(r['error'].values()) < winograd.TOLERANCE, r
    assert len(r['ms']) == 5 and min(r['ms'].values()) > 0
  # 1/8 width, batch 2: conv1_1 and conv2_1 have 3 and 8 input channels, and from conv3_1
  # on (8 x 8: 2 x 2 tiles an image) there are at most 8 tiles.
  assert {r['auto'] for r in report['rows']} == {'xla'}
  assert 'auto train' in stdout and 'auto inference (U kept)' in stdout
