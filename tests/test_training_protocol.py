"""Sec. 3.1's training protocol: Table 3's grid, seeding from net A and the scale chain,
gradient accumulation, and changing the device count between checkpoints."""

import importlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import table3
from vgg_jax import config_validation
from vgg_jax import default_config
from vgg_jax import errors
from vgg_jax import init_from
from vgg_jax import models
from vgg_jax import plots
from vgg_jax import steps
from vgg_jax import train
from tests import test_steps
from tests.test_train import run_main

NUM_DEVICES = 8


def fresh_rng() -> np.random.Generator:
  return np.random.default_rng(int.from_bytes(os.urandom(8), 'little'))


# ---------------------------------------------------------------------------------------------
# Table 3's grid.


@pytest.mark.parametrize('module', ['configA', 'configA_LRN', 'configB', 'configC', 'configD',
                                    'configE'])
def test_config_files_take_table3s_training_scales(module):
  get_config = importlib.import_module(f'experiments.{module}').get_config
  assert get_config().train_scale == 256
  assert get_config('S=256').train_scale == 256
  assert get_config('S=384').train_scale == 384
  assert tuple(get_config('S=256-512').train_scale) == (256, 512)
  for arg in ('S=256', 'S=384', 'S=256-512'):
    config_validation.validate(get_config(arg), num_devices=8)
  with pytest.raises(ValueError, match="'S=300'.*S=256, S=384, S=256-512"):
    get_config('S=300')


def test_table3_grid_has_every_row_and_the_papers_initialisation_chain():
  runs = table3.get_runs()
  by_name = {run.name: run for run in runs}
  # Table 3's cells, typed from the paper: A, A-LRN, B at S = 256; C, D, E at all three.
  cells = {('A', '256'), ('A_LRN', '256'), ('B', '256')} | {
      (net, s) for net in 'CDE' for s in ('256', '384', '256-512')}
  got = set()
  for run in runs:
    file, arg = run.config.split(':')
    got.add((os.path.basename(file)[len('config'):-len('.py')], arg[len('S='):]))
  assert got == cells and len(runs) == len(cells)
  for position, run in enumerate(runs):
    if run.depends_on is not None:
      assert [r.name for r in runs].index(run.depends_on) < position, run.name
  for net in 'BCDE':
    seeded = by_name[f'{net}_S256']
    assert (seeded.depends_on, seeded.init_mode) == ('A_S256', 'net_a')
  for net in 'CDE':
    s384, jittered = by_name[f'{net}_S384'], by_name[f'{net}_S256-512']
    assert (s384.depends_on, s384.init_mode) == (f'{net}_S256', 'all')
    assert '--config.learning_rate=0.001' in s384.overrides
    assert (jittered.depends_on, jittered.init_mode) == (f'{net}_S384', 'all')
  assert by_name['A_S256'].depends_on is None and by_name['A-LRN_S256'].depends_on is None


# ---------------------------------------------------------------------------------------------
# Seeding from another run.


@pytest.fixture(scope='module')
def net_a_dir(tmp_path_factory, digits_config):
  """A briefly trained narrow net A on the digits."""
  workdir = str(tmp_path_factory.mktemp('net_a'))
  config = digits_config.copy_and_resolve_references()
  config.train_scale = (32, 36)
  config.variant, config.width, config.num_train_steps = 'A', 1 / 16, 3
  train.train_and_evaluate(config, workdir)
  return workdir


def saved_params(workdir) -> dict:
  """The newest checkpoint's parameters, read with Orbax directly (no vgg_jax code)."""
  path = os.path.join(workdir, 'checkpoints')
  step = max(int(name) for name in os.listdir(path) if name.isdigit())
  path = os.path.join(path, str(step), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))['params']


def fresh_params(variant, width=1 / 16, seed=0) -> dict:
  model = models.VGG(variant, num_classes=10, width=width)
  return jax.device_get(model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))['params'])


def seeding_config(digits_config, source_dir, variant='D', mode='net_a', width=1 / 16):
  config = digits_config.copy_and_resolve_references()
  config.train_scale = (32, 36)
  config.variant, config.width, config.init_from, config.init_mode = variant, width, source_dir, mode
  return config


def test_seeding_from_net_a_copies_its_seven_layers_and_leaves_the_rest(net_a_dir, digits_config):
  net_a = saved_params(net_a_dir)
  fresh = fresh_params('D', seed=fresh_rng().integers(1 << 30))
  seeded = init_from.seed_params(fresh, seeding_config(digits_config, net_a_dir))
  copied = {'conv1_1', 'conv2_1', 'conv3_1', 'conv3_2', 'fc6', 'fc7', 'fc8'}
  assert set(seeded) == set(models.layer_names('D'))
  for layer in seeded:
    for name in ('kernel', 'bias'):
      value = np.asarray(seeded[layer][name])
      if layer in copied:
        np.testing.assert_array_equal(value, net_a[layer][name])
      else:
        np.testing.assert_array_equal(value, fresh[layer][name])
        assert layer not in net_a or not np.array_equal(value, net_a[layer][name])


def test_seeding_refuses_a_shape_mismatch_naming_the_layer(net_a_dir, digits_config):
  wider = fresh_params('D', width=1 / 8)
  with pytest.raises(errors.ConfigError,
                     match=r'width=0.0625, this run has width=0.125; init_mode=net_a'):
    init_from.seed_params(wider, seeding_config(digits_config, net_a_dir, width=1 / 8))
  with pytest.raises(ValueError, match=r'conv1_1/kernel.*\(3, 3, 3, 4\).*\(3, 3, 3, 8\)'):
    init_from.transplant(wider, saved_params(net_a_dir), init_from.NET_A_LAYERS)


def test_init_mode_all_needs_the_same_net(net_a_dir, digits_config):
  with pytest.raises(errors.ConfigError,
                     match="variant='A', this run has variant='D'; init_mode=all"):
    init_from.seed_params(fresh_params('D'),
                            seeding_config(digits_config, net_a_dir, mode='all'))
  a = fresh_params('A', seed=5)
  seeded = init_from.seed_params(a, seeding_config(digits_config, net_a_dir, 'A', 'all'))
  for layer, value in saved_params(net_a_dir).items():
    np.testing.assert_array_equal(seeded[layer]['kernel'], value['kernel'])


def test_init_from_a_workdir_without_checkpoints_says_to_train_it_first(tmp_path, digits_config):
  with pytest.raises(errors.ConfigError,
                     match='init_from=.*no checkpoint in.*train that net'):
    init_from.seed_params(fresh_params('D'), seeding_config(digits_config, str(tmp_path)))


def test_training_from_init_from_starts_at_the_seeded_weights(net_a_dir, digits_config,
                                                              tmp_path):
  """Through the training loop: a seeded net D, one step at a negligible learning rate."""
  config = seeding_config(digits_config, net_a_dir)
  config.num_train_steps, config.learning_rate = 1, 1e-12
  config.weight_decay = 0.0
  train.train_and_evaluate(config, str(tmp_path))
  trained, net_a = saved_params(str(tmp_path)), saved_params(net_a_dir)
  for layer in ('conv1_1', 'conv3_2', 'fc6', 'fc8'):
    np.testing.assert_allclose(trained[layer]['kernel'], net_a[layer]['kernel'], rtol=1e-6,
                               atol=1e-9)
  assert trained['conv1_2']['kernel'].shape == (3, 3, 4, 4)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation.


def accum_config(digits_config, accum):
  config = digits_config.copy_and_resolve_references()
  config.train_scale = (32, 36)
  config.variant, config.width, config.dropout_rate = 'A', 1 / 8, 0.0
  config.grad_accum_steps = accum
  # XLA's convolutions on both sides: 'auto' picks Winograd by the number of 4x4 tiles, hence
  # by the micro-batch size, and the two algorithms round differently.
  config.conv_algorithm = 'xla'
  return config


@pytest.mark.parametrize('accum', [2, 4])
def test_accumulated_micro_batches_update_exactly_as_one_big_batch(digits_config, accum):
  """k micro-batches per device, gradients averaged, = the whole batch at once (two steps, so
  momentum and weight decay are in play; colour shift on): the same updates W - W0, up to
  float32 sums in another order, on a fixed draw."""
  rng = np.random.default_rng(20261206 + accum)
  whole, split = accum_config(digits_config, 1), accum_config(digits_config, accum)
  key = jax.random.key(rng.integers(1 << 30))
  states = [steps.create_train_state(c, key, 32) for c in (whole, split)]
  initial = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(states[0].params))
  step_fns = [steps.pmap_train_step(c, donate=False) for c in (whole, split)]
  for _ in range(2):
    batch = {'image': rng.integers(0, 256, (NUM_DEVICES, 8, 32, 32, 3), dtype=np.uint8),
             'label': rng.integers(0, 10, (NUM_DEVICES, 8), dtype=np.int32)}
    results = [fn(state, batch, jax.random.key(3)) for fn, state in zip(step_fns, states)]
    states = [state for state, _ in results]
    (_, m_whole), (_, m_split) = results
    assert float(m_split['loss']) == pytest.approx(float(m_whole['loss']), rel=1e-5)
    assert float(m_split['top1_error']) == pytest.approx(float(m_whole['top1_error']))
  got, expected = (jax.device_get(s.params) for s in states)
  errors_ = test_steps.update_errors(got, expected, initial)
  assert max(errors_.values()) <= test_steps.UPDATE_TOLERANCE, max(errors_.items(),
                                                                   key=lambda e: e[1])


def test_accumulation_that_does_not_split_the_device_batch_is_refused():
  config = default_config.get_config()
  config.grad_accum_steps = 3  # 256 / 8 devices = 32 per device.
  with pytest.raises(errors.ConfigError,
                     match=r'^config.grad_accum_steps=3: .*32 per device'):
    config_validation.validate(config, num_devices=8)


# ---------------------------------------------------------------------------------------------
# A checkpoint of 8 devices continues on 4.


TINY = ('--config.variant=A', '--config.width=0.0625', '--config.batch_size=64',
        '--config.log_every_steps=2', '--config.eval_every_steps=4',
        '--config.checkpoint_every_steps=4')


@pytest.mark.slow
def test_checkpoint_written_on_8_devices_restores_and_continues_on_4(tmp_path, digits_config):
  run_main(tmp_path, digits_config.data_dir, *TINY, '--config.num_train_steps=4',
           devices=8)
  before = saved_params(str(tmp_path))
  result = run_main(tmp_path, digits_config.data_dir, *TINY, '--config.num_train_steps=8',
                    devices=4)
  assert 'Resumed from' in result.stderr and 'at step 4' in result.stderr
  assert '4 device(s)' in result.stderr
  with open(tmp_path / 'eval_metrics.json') as f:
    assert json.load(f)['step'] == 8
  after = saved_params(str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints'))[-1] == '8'
  assert not np.array_equal(after['fc8']['kernel'], before['fc8']['kernel'])
  assert all(np.all(np.isfinite(v['kernel'])) for v in after.values())


# ---------------------------------------------------------------------------------------------
# Several hosts.


@pytest.mark.slow
def test_two_processes_of_4_devices_train_as_one_of_8_on_the_same_global_batches(
    tmp_path, digits_config, monkeypatch):
  """launch.local runs 2 processes x 4 CPU devices (gloo); each reads its own shard. The
  reference: one process, 8 devices, fed each step the two shards' batches side by side."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.test_train import REPO  # pylint: disable=g-import-not-at-top
  from vgg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  num_steps = 3
  flags = ['--config=experiments/digits.py', f'--workdir={tmp_path}',
           f'--config.data_dir={digits_config.data_dir}', '--config.variant=A',
           '--config.width=0.0625', '--config.batch_size=64', '--config.log_every_steps=1',
           '--config.eval_every_steps=100', f'--config.num_train_steps={num_steps}']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run([sys.executable, '-m', 'launch.local', '--num_processes=2',
                           '--devices_per_process=4', '--', *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  output = result.stdout + result.stderr
  assert 'process 0 of 2' in output and '8 device(s) in 2 process(es)' in output
  assert 'process 1 of 2' not in output and '[Gloo] Rank' not in output  # Process 0 alone.
  two_hosts = saved_params(str(tmp_path))
  # Only process 0 writes summaries and the final metrics.
  assert len(os.listdir(tmp_path / 'tensorboard')) == 1

  config = digits_config.copy_and_resolve_references()
  config.train_scale = (32, 36)
  config.variant, config.width, config.batch_size = 'A', 0.0625, 64
  builder = input_pipeline.get_builder(config)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  streams = []
  for process in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda p=process: p)
    streams.append(input_pipeline.as_numpy(input_pipeline.train_dataset(builder, config)))
  monkeypatch.undo()
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state = steps.create_train_state(config, init_rng, config.image_size)
  p_train_step = steps.pmap_train_step(config)
  for _ in range(num_steps):
    parts = [next(stream) for stream in streams]
    batch = {k: np.concatenate([p[k].reshape((-1,) + p[k].shape[2:]) for p in parts])
             for k in ('image', 'label')}
    batch = {k: v.reshape((NUM_DEVICES, -1) + v.shape[1:]) for k, v in batch.items()}
    state, _ = p_train_step(state, batch, step_rng)
  one_host = jax.device_get(state.params)
  for layer, value in one_host.items():
    for name in ('kernel', 'bias'):
      np.testing.assert_allclose(two_hosts[layer][name], value[name], rtol=1e-5, atol=1e-7,
                                 err_msg=f'{layer}/{name}')


def test_each_plateau_drop_is_logged_and_the_logged_rate_is_the_one_in_force(
    tmp_path, digits_config, caplog):
  """Sec. 3.1's rule with patience 1 on a net that cannot improve (rate 1e-9): the validation
  error of step 1 is the best, each later one stalls, so the rate drops at steps 2 and 3 and
  then stays (two drops allowed). Logged every 2 steps: the log of step 4 covers steps run at
  1e-10 and 1e-11, and names the latter, the rate in force."""
  config = digits_config.copy_and_resolve_references()
  config.update(variant='A', width=0.0625, batch_size=64, num_train_steps=4, log_every_steps=2,
                eval_every_steps=1, checkpoint_every_steps=100, learning_rate=1e-9,
                lr_plateau_patience=1, lr_max_decreases=2)
  with caplog.at_level('INFO', logger='absl'):
    train.train_and_evaluate(config, str(tmp_path))
  drops = re.findall(r'step (\d+): validation error did not improve for 1 evaluations; '
                     r'learning rate (\S+) -> (\S+) \(drop (\d) of 2\)', caplog.text)
  assert drops == [('2', '1e-09', '1e-10', '1'), ('3', '1e-10', '1e-11', '2')], caplog.text
  logged = [float(r) for r in re.findall(r'step \d/4: .* lr (\S+),', caplog.text)]
  assert logged == pytest.approx([1e-9, 1e-11], rel=1e-5)
  # TensorBoard holds, per step written, the rate in force after it: what learning_rate.png
  # draws as steps.
  steps_, rates = plots.read_scalars(str(tmp_path))['train/learning_rate']
  assert list(steps_) == [2, 3, 4]
  assert rates == pytest.approx([1e-10, 1e-11, 1e-11], rel=1e-5)
