"""Long runs on preemptible machines: SIGTERM, SIGKILL, non-finite steps, failed checkpoint
writes, and bad configs caught before anything compiles."""

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from etils import epath
import jax
import numpy as np
import pytest

from tests import fault_injection
from tests.test_evaluation import count_compilations
from tests.test_steps import device_split, fresh_rng, random_batch, small_config
from tests.test_train import REPO, restored_params
from vgg_jax import checkpoints
from vgg_jax import default_config
from vgg_jax import errors
from vgg_jax import init_from
from vgg_jax import steps
from vgg_jax import train

# A narrow net A on the digits, fast enough to run many steps.
TINY = dict(variant='A', width=0.0625, batch_size=64, log_every_steps=1, eval_every_steps=10,
            checkpoint_every_steps=4, keep_checkpoints=2)


def tiny_config(digits_config, **overrides):
  config = digits_config.copy_and_resolve_references()
  config.update({**TINY, **overrides})
  return config


def all_finite(tree) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(tree)))


# ---------------------------------------------------------------------------------------------
# SIGTERM and SIGKILL.


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'Ctrl-C'])
def test_sigterm_or_ctrl_c_saves_the_current_step_exits_zero_and_the_rerun_resumes_there(
    tmp_path, digits_config, signum):
  flags = ['--config=experiments/digits.py', f'--workdir={tmp_path}',
           *[f'--config.{k}={v}' for k, v in {**TINY, 'checkpoint_every_steps': 1000}.items()],
           f'--config.data_dir={digits_config.data_dir}']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / 'jax_cache')
  process = subprocess.Popen([sys.executable, '-m', 'vgg_jax.main', *flags,
                              '--config.num_train_steps=5000'], cwd=REPO, env=env,
                             stderr=subprocess.PIPE, text=True)
  lines, seen = [], threading.Event()

  def read():
    for line in process.stderr:
      lines.append(line)
      if re.search(r'step 5/5000', line):
        seen.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  assert seen.wait(300), ''.join(lines[-20:])
  process.send_signal(signum)
  sent = time.monotonic()
  code = process.wait(120)
  seconds = time.monotonic() - sent
  reader.join()
  log = ''.join(lines)
  assert code == 0, log[-3000:]
  assert seconds < 20, seconds
  name = 'SIGTERM' if signum == signal.SIGTERM else 'Ctrl-C'
  step = int(re.search(rf'Stopped by {name} at step (\d+): its checkpoint is saved', log).group(1))
  assert 5 <= step < 1000  # Not a scheduled checkpoint: the one the signal asked for.
  assert checkpoints.latest_step(str(tmp_path)) == step
  assert not (tmp_path / 'eval_metrics.json').exists()
  assert 'Traceback' not in log and 'KeyboardInterrupt' not in log
  if signum == signal.SIGINT:
    return  # Resuming is the same for both.

  rerun = subprocess.run([sys.executable, '-m', 'vgg_jax.main', *flags,
                          f'--config.num_train_steps={step + 2}'], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'at step {step}.' in rerun.stderr
  assert checkpoints.latest_step(str(tmp_path)) == step + 2


@pytest.mark.slow
def test_sigterm_to_process_1_of_2_saves_one_step_in_both_and_the_rerun_equals_an_uninterrupted_run(
    tmp_path, digits_config):
  """Several processes stop through JAX's preemption service, not Preemption's handlers: the
  notice sent to process 1 alone (not the coordinator) must reach process 0 and both must save
  one step together, or the run hangs in a collective or leaves a torn checkpoint. The rerun
  must end bitwise where an uninterrupted run does; both stop 2 steps after the saved one (the
  step count changes no update)."""
  flags = ['--config=experiments/digits.py',
           *[f'--config.{k}={v}' for k, v in {**TINY, 'checkpoint_every_steps': 1000}.items()]]
  preempted, reference = str(tmp_path / 'preempted'), str(tmp_path / 'reference')
  started = []

  def start(workdir, num_steps, port):
    hosts = fault_injection.start_hosts(workdir, digits_config.data_dir,
                                        [*flags, f'--config.num_train_steps={num_steps}'], port)
    started.extend(hosts)
    return hosts

  def finish(hosts, timeout):
    """Each host's log, once all have exited 0 (within `timeout` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(h.process.poll() is None for h in hosts):
      time.sleep(0.1)
    codes = [h.process.poll() for h in hosts]
    for host in hosts:
      host.stop()
      host.reader.join()
    logs = [''.join(host.lines) for host in hosts]
    assert codes == [0] * len(hosts), (f'exit codes {codes} (None: still running after '
                                       f'{timeout} s)', *[log[-3000:] for log in logs])
    return logs

  try:
    hosts = start(preempted, 5000, *fault_injection.free_ports(1))
    deadline = time.monotonic() + 600
    while min(host.last_step for host in hosts) < 3:  # Both compiled, in the loop.
      assert time.monotonic() < deadline and all(h.process.poll() is None for h in hosts), [
          ''.join(h.lines[-20:]) for h in hosts]
      time.sleep(0.05)
    hosts[1].process.send_signal(signal.SIGTERM)
    logs = finish(hosts, 180)
    saved = [re.findall(r'Stopped by SIGTERM at step (\d+): its checkpoint is saved', log)
             for log in logs]
    assert len(saved[0]) == 1 and saved[1] == saved[0], (saved, *[l[-3000:] for l in logs])
    step = int(saved[0][0])
    assert 3 <= step < 1000, step  # Not a scheduled checkpoint: the one the notice asked for.
    assert checkpoints.latest_step(preempted) == step
    assert not os.path.exists(os.path.join(preempted, 'eval_metrics.json'))
    assert not any('Traceback' in log for log in logs)

    # The rerun and an uninterrupted run of the same command, side by side.
    rerun_port, reference_port = fault_injection.free_ports(2)
    logs = finish(start(preempted, step + 2, rerun_port) +
                  start(reference, step + 2, reference_port), 600)
    for log in logs[:2]:
      assert re.search(rf'Resumed from \S+ at step {step}\.', log), log[-3000:]
      assert f'step {step + 1}/{step + 2}: loss' in log, log[-3000:]
    assert f'step 1/{step + 2}: loss' in logs[2]
  finally:
    for host in started:
      host.stop()
  params = []
  for workdir in (preempted, reference):
    assert checkpoints.latest_step(workdir) == step + 2
    params.append(jax.device_get(checkpoints.restore_params(
        workdir, checkpoints.load_config(workdir))))
  assert fault_injection.same(*params)


def test_a_first_ctrl_c_asks_the_loop_to_stop_and_a_second_aborts():
  before = signal.getsignal(signal.SIGINT)
  preemption = train.Preemption()
  try:
    assert not preemption.reached(1)
    signal.raise_signal(signal.SIGINT)
    assert preemption.reached(2) and preemption.requested_by == 'Ctrl-C'
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  finally:
    preemption.close()
  assert signal.getsignal(signal.SIGINT) is before


class _RaisesSignalWhenCollected:
  """Sends SIGINT from its __del__, where Python prints and ignores any exception: what a
  second Ctrl-C meets when it lands in a TensorFlow object's __del__."""

  def __del__(self):
    signal.raise_signal(signal.SIGINT)


# Python reports the ignored KeyboardInterrupt through pytest as a warning: what is tested.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_second_ctrl_c_aborts_even_when_its_interrupt_lands_in_a_del():
  before = signal.getsignal(signal.SIGINT)
  preemption = train.Preemption()
  try:
    signal.raise_signal(signal.SIGINT)
    assert preemption.reached(1)
    _RaisesSignalWhenCollected()  # Collected at once; its KeyboardInterrupt is ignored.
    with pytest.raises(KeyboardInterrupt):
      preemption.reached(2)
  finally:
    preemption.close()
  assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_ctrl_c_twice_within_a_step_aborts_nonzero_leaving_the_saved_checkpoints_whole(
    tmp_path, digits_config):
  """Two Ctrl-C 0.2 s apart, while steps of 0.3-1 s run: the process exits non-zero in one
  line, and the checkpoints already written restore."""
  flags = ['--config=experiments/digits.py', f'--workdir={tmp_path}', '--config.width=0.5',
           '--config.log_every_steps=1', '--config.checkpoint_every_steps=2',
           '--config.num_train_steps=5000', f'--config.data_dir={digits_config.data_dir}']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  process = subprocess.Popen([sys.executable, '-m', 'vgg_jax.main', *flags], cwd=REPO,
                             env=env, stderr=subprocess.PIPE, text=True)
  lines, seen = [], threading.Event()

  def read():
    for line in process.stderr:
      lines.append(line)
      if 'Saving checkpoint of step 4 ' in line:
        seen.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  assert seen.wait(300), ''.join(lines[-20:])
  process.send_signal(signal.SIGINT)
  time.sleep(0.2)
  process.send_signal(signal.SIGINT)
  code = process.wait(120)
  reader.join()
  log = ''.join(lines)
  assert code != 0, log[-3000:]
  assert 'aborted (Ctrl-C)' in log.strip().splitlines()[-1], log[-3000:]
  assert 'Traceback' not in log, log[-3000:]
  step = checkpoints.latest_step(str(tmp_path))
  assert step >= 4
  config = checkpoints.load_config(str(tmp_path))
  assert all_finite(checkpoints.restore_params(str(tmp_path), config, step))


@pytest.mark.slow
def test_sigkill_at_random_moments_and_mid_write_loses_nothing(tmp_path, digits_config):
  """Two trials of tests/fault_injection.py (docs/reliability.md: `python -m tests.fault_injection`):
  the first killed during a checkpoint write, the second between writes."""
  lines = []
  summary = fault_injection.run_trials(2, str(tmp_path), digits_config.data_dir,
                                       seed=int(fresh_rng().integers(1 << 30)), max_kills=1,
                                       log=lines.append)
  report = '\n'.join(lines)
  assert summary['kills'] == 2 and summary['restores'] == 2, report
  assert summary['kills_during_checkpoint_write'] >= 1, report
  assert summary['data_lost'] == 0 and summary['final_params_differ'] == 0, report
  assert not any(fault_injection.TMP_MARK in name
                 for name in os.listdir(tmp_path / 'trial_0' / 'checkpoints'))


# ---------------------------------------------------------------------------------------------
# Non-finite steps.


def test_a_nonfinite_step_leaves_parameters_and_momentum_untouched_and_is_counted():
  config = small_config(dropout_rate=0.0)
  rng = fresh_rng()
  state = steps.create_train_state(config, jax.random.key(rng.integers(1 << 30)), 32)
  p_train_step = steps.pmap_train_step(config, donate=False)
  batch = device_split(random_batch(rng, 16))
  state, metrics = p_train_step(state, batch, jax.random.key(1))  # Builds up momentum.
  assert float(metrics['nonfinite']) == 0 and int(state.nonfinite_steps) == 0
  before = jax.device_get(state)

  poisoned = jax.device_get(state.params)
  poisoned['fc8']['bias'] = poisoned['fc8']['bias'].copy()
  poisoned['fc8']['bias'][rng.integers(10)] = np.nan
  bad_state = state.replace(params=jax.device_put(poisoned, steps.replicated_sharding()))
  after, metrics = p_train_step(bad_state, batch, jax.random.key(2))
  assert float(metrics['nonfinite']) == 1 and not np.isfinite(float(metrics['loss']))
  assert int(after.step) == int(before.step) + 1 and int(after.nonfinite_steps) == 1
  for a, b in zip(jax.tree.leaves(jax.device_get(after.params)), jax.tree.leaves(poisoned)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(jax.device_get(after.opt_state)),
                  jax.tree.leaves(before.opt_state)):
    np.testing.assert_array_equal(a, b)

  # The same step from the finite state does change them, so the equalities above can fail.
  fine, metrics = p_train_step(state, batch, jax.random.key(3))
  assert float(metrics['nonfinite']) == 0
  assert not np.array_equal(jax.device_get(fine.params)['fc8']['kernel'],
                            before.params['fc8']['kernel'])


def test_divergence_stops_training_naming_the_step_and_keeps_the_last_checkpoint(
    tmp_path, digits_config):
  config = tiny_config(digits_config, learning_rate=1e6, num_train_steps=8,
                       checkpoint_every_steps=1, keep_checkpoints=8)
  with pytest.raises(train.NonFiniteError,
                     match=r'^step (\d+): the (loss|gradient norm) is (nan|inf|-inf)\. ') as e:
    train.train_and_evaluate(config, str(tmp_path))
  bad_step = int(re.match(r'step (\d+)', str(e.value)).group(1))
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved and saved[-1] == bad_step - 1, (saved, bad_step)
  step, params = restored_params(tmp_path, config)
  assert step == bad_step - 1 and all_finite(params)


def test_a_nonfinite_step_stops_the_run_at_the_next_step_not_at_the_next_log(
    tmp_path, digits_config, monkeypatch):
  """Logs and checkpoints every 100 steps; the run diverges within a few steps and must not
  run on to step 40 before noticing."""
  config = tiny_config(digits_config, learning_rate=1e6, num_train_steps=40, log_every_steps=100,
                       checkpoint_every_steps=100, eval_every_steps=100)
  calls, pmap_train_step = [], steps.pmap_train_step

  def counted(*args, **kwargs):
    step = pmap_train_step(*args, **kwargs)
    return lambda *a: calls.append(1) or step(*a)

  monkeypatch.setattr(steps, 'pmap_train_step', counted)
  with pytest.raises(train.NonFiniteError, match=r'^step (\d+): ') as e:
    train.train_and_evaluate(config, str(tmp_path))
  bad_step = int(re.match(r'step (\d+)', str(e.value)).group(1))
  assert bad_step < 39 and len(calls) == bad_step + 1, (bad_step, len(calls))


def test_skip_nonfinite_steps_trains_on_and_counts_what_it_skipped(tmp_path, digits_config,
                                                                   caplog):
  config = tiny_config(digits_config, learning_rate=1e6, num_train_steps=6,
                       eval_every_steps=100, skip_nonfinite_steps=True)
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(config, str(tmp_path))
  skipped = [int(m) for m in re.findall(r'step (\d+): the .* is .*; update skipped',
                                        caplog.text)]
  assert skipped and skipped == sorted(set(skipped))
  state = steps.create_train_state(config, jax.random.key(0), config.image_size)
  restored = checkpoints.restore_latest(checkpoints.create_manager(str(tmp_path), config), state)
  assert int(restored.step) == 6 and int(restored.nonfinite_steps) == len(skipped)
  assert all_finite(restored.params)


# ---------------------------------------------------------------------------------------------
# Checkpoint writes and restores.


def test_a_failed_checkpoint_write_is_reported_and_the_previous_checkpoint_survives(
    tmp_path, digits_config, monkeypatch):
  """The disk fills up while step 8 is being written (ENOSPC from every file write)."""
  config = tiny_config(digits_config, num_train_steps=12)
  real_save = checkpoints.save

  def save_then_fill_the_disk(manager, state, config):
    if int(jax.device_get(state.step)) == 8:
      manager.wait_until_finished()  # Step 4 is on disk before the disk fills.

      def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
      monkeypatch.setattr(epath.Path, 'write_text', no_space)
      monkeypatch.setattr(epath.Path, 'write_bytes', no_space)
    real_save(manager, state, config)

  monkeypatch.setattr(checkpoints, 'save', save_then_fill_the_disk)
  with pytest.raises(checkpoints.CheckpointWriteError,
                     match=r'No space left on device.*of step 4, is intact.*rerun'):
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()
  assert checkpoints.latest_step(str(tmp_path)) == 4
  step, params = restored_params(tmp_path, config)
  assert step == 4 and all_finite(params)
  result = train.train_and_evaluate(config, str(tmp_path))  # Disk freed: resumes from 4.
  assert result['step'] == 12 and checkpoints.latest_step(str(tmp_path)) == 12


def save_untrained(workdir, config) -> None:
  state = steps.create_train_state(config, jax.random.key(0), config.image_size)
  manager = checkpoints.create_manager(str(workdir), config)
  checkpoints.save(manager, state, config)
  checkpoints.wait_until_finished(manager)


@pytest.fixture(scope='module')
def untrained_run(tmp_path_factory, digits_config):
  """(workdir, config): a workdir holding the checkpoint of an untrained tiny net A."""
  config = tiny_config(digits_config, train_scale=(64, 72))
  workdir = tmp_path_factory.mktemp('untrained_a')
  save_untrained(workdir, config)
  return workdir, config


def refused_resume(tmp_path, untrained_run, field, value):
  """Resumes a copy of the untrained run with config.`field` = `value`: (saved config, changed
  config, the ConfigError's message, compilations meanwhile)."""
  saved, config = untrained_run
  shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
  changed = config.copy_and_resolve_references()
  changed[field] = value
  with count_compilations() as compiled:
    with pytest.raises(errors.ConfigError) as error:
      train.train_and_evaluate(changed, str(tmp_path))
  return config, changed, str(error.value), compiled


@pytest.mark.parametrize('field,value', [('variant', 'B'), ('width', 0.125),
                                         ('num_classes', 12), ('image_size', 64)])
def test_resuming_with_other_parameter_shapes_fails_before_building_anything(
    tmp_path, untrained_run, field, value):
  config, _, message, compiled = refused_resume(tmp_path, untrained_run, field, value)
  assert message.startswith(f'config.{field}={value!r}: '), message
  assert f'{field}={config[field]!r}' in message and not compiled


@pytest.mark.parametrize('field,value', [('batch_size', 32), ('seed', 1),
                                         ('train_split', 'train[:90%]')])
def test_resuming_with_another_data_order_is_refused_before_compiling_unless_allowed(
    tmp_path, untrained_run, field, value, caplog):
  """The rest of the interrupted epoch would repeat or skip examples: one line naming the
  field and the way out; allowed, the change is logged."""
  config, changed, message, compiled = refused_resume(tmp_path, untrained_run, field, value)
  assert message.startswith(f'config.{field}={value!r}: ') and '\n' not in message, message
  assert f'{field}={config[field]!r}' in message and 'allow_data_order_change=True' in message
  assert not compiled
  changed.allow_data_order_change = True
  with caplog.at_level('WARNING', logger='absl'):
    assert init_from.check_resume(str(tmp_path), changed)
  assert f'{field}={value!r} instead of {config[field]!r}' in caplog.text


def test_no_checkpoint_is_ever_loaded_with_pickle(untrained_run, monkeypatch):
  import pickle  # pylint: disable=g-import-not-at-top
  tmp_path, config = untrained_run

  def forbidden(*args, **kwargs):
    raise AssertionError('pickle used')

  monkeypatch.setattr(pickle, 'load', forbidden)
  monkeypatch.setattr(pickle, 'loads', forbidden)
  assert restored_params(tmp_path, config)[0] == 0
  assert checkpoints.load_config(str(tmp_path)).variant == 'A'
  assert not [p for p in tmp_path.rglob('*') if p.suffix in ('.pkl', '.pickle')]


def test_an_older_checkpoints_config_reads_as_todays_defaults_but_where_it_trained_otherwise(
    tmp_path, untrained_run):
  """A checkpoint written before a field existed: the field reads as it was then where that
  differs from today's default (default_config.BEFORE_THE_FIELD), else as today's default."""
  workdir, config = untrained_run
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  older = config.copy_and_resolve_references()
  for field in ('sgd_form', 'decode_crop', 'test_flip', 'frozen_layers', 'grad_accum_steps'):
    del older[field]
  state = steps.create_train_state(config, jax.random.key(0), config.image_size)
  manager = checkpoints.create_manager(str(tmp_path), config)
  checkpoints.save(manager, state.replace(step=state.step + 1), older)
  checkpoints.wait_until_finished(manager)
  checkpoints.close(manager)

  loaded = checkpoints.load_config(str(tmp_path))
  assert set(loaded) == set(default_config.get_config())
  assert (loaded.sgd_form, loaded.decode_crop) == ('pytorch', False)
  defaults = default_config.get_config()
  assert not config.test_flip and loaded.test_flip == defaults.test_flip
  assert (loaded.frozen_layers, loaded.grad_accum_steps) == (
      defaults.frozen_layers, defaults.grad_accum_steps)
  assert (loaded.variant, loaded.width, loaded.train_scale) == ('A', 0.0625, (64, 72))
  with pytest.raises(errors.ConfigError, match=r"^config.sgd_form='caffe': .* sgd_form='pytorch'"):
    init_from.check_resume(str(tmp_path), config)


# ---------------------------------------------------------------------------------------------
# Bad configs and arguments: one line naming the field and the value, nothing compiled.


def _other_variant_run(tmp_path, config):
  source = tmp_path / 'net_b'
  b = config.copy_and_resolve_references()
  b.variant = 'B'
  save_untrained(source, b)
  return str(source)


def _not_a_directory(tmp_path, config):
  (tmp_path / 'a_file').write_text('')
  return str(tmp_path / 'a_file' / 'run')


def _empty_manual_dir(tmp_path, config):
  (tmp_path / 'manual').mkdir()
  return str(tmp_path / 'manual')


# (case, config overrides (a callable value is built in tmp_path), expected field, pattern)
BAD_RUNS = [
    ('unknown variant', {'variant': 'F'}, 'variant', 'expected one of A, A-LRN'),
    ('negative learning rate', {'learning_rate': -0.01}, 'learning_rate', 'positive'),
    ('S range inverted', {'train_scale': (40, 32)}, 'train_scale', 'Smin=40 > Smax=32'),
    ('crop larger than S', {'image_size': 64}, 'image_size', 'larger than the smallest'),
    ('batch not divisible by devices', {'batch_size': 60}, 'batch_size', 'multiple of the 8'),
    ('micro-batches do not divide', {'grad_accum_steps': 3}, 'grad_accum_steps', 'equal micro'),
    ('unknown dtype', {'dtype': 'float64'}, 'dtype', 'float32, bfloat16'),
    ('unknown test protocol', {'eval_protocols': 'tencrop'}, 'eval_protocols', 'expected'),
    ('unknown init_mode', {'init_mode': 'some'}, 'init_mode', 'net_a, all'),
    ('init_from missing', {'init_from': lambda t, c: str(t / 'nowhere')}, 'init_from',
     'no checkpoint in'),
    ('init_from another variant', {'init_from': _other_variant_run}, 'init_from',
     'holds net B, but init_mode=net_a seeds from net A'),
    ('unknown dataset', {'dataset': 'imagenet2021'}, 'dataset', 'not a tfds dataset'),
    ('manual_dir without the archives', {'dataset': 'imagenet2012', 'num_classes': 1000,
                                         'data_dir': lambda t, c: str(t / 'tfds'),
                                         'manual_dir': _empty_manual_dir},
     'manual_dir', 'ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar are missing'),
    ('classes differ from the dataset', {'num_classes': 1000}, 'num_classes', 'has 10 classes'),
    ('zero-length schedule', {'num_train_steps': -1, 'num_epochs': 0.0}, 'num_epochs',
     'positive'),
    ('bad checkpoint interval', {'checkpoint_every_steps': 0}, 'checkpoint_every_steps',
     'positive'),
    # 40 examples, 8 devices: the largest batch is 40, half of it rounded to the devices 16.
    ('batch larger than the split', {'train_split': 'train[:40]'}, 'batch_size',
     r"larger than the 'train\[:40\]' split of sklearn_digits \(40 examples\).*at most 40, "
     r'e\.g\. --config\.batch_size=16\.$'),
]


@pytest.mark.parametrize('case,overrides,field,pattern', BAD_RUNS, ids=[c[0] for c in BAD_RUNS])
def test_bad_run_fails_in_one_line_naming_field_and_value_before_compiling(
    tmp_path, digits_config, case, overrides, field, pattern):
  del case
  config = tiny_config(digits_config)
  for name, value in overrides.items():
    config[name] = value(tmp_path, config) if callable(value) else value
  with count_compilations() as compiled:
    with pytest.raises(errors.ConfigError) as error:
      train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(error.value)
  assert message.startswith(f'config.{field}={config[field]!r}: '), message
  assert re.search(pattern, message) and '\n' not in message, message
  assert not compiled


def test_unwritable_workdir_fails_naming_it_before_compiling(tmp_path, digits_config):
  workdir = _not_a_directory(tmp_path, None)
  with count_compilations() as compiled:
    with pytest.raises(errors.ConfigError,
                       match=rf"^--workdir='{re.escape(workdir)}': cannot write there"):
      train.train_and_evaluate(tiny_config(digits_config), workdir)
  assert not compiled


def test_cli_names_a_mistyped_config_field_and_the_near_ones(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'vgg_jax.main', '--config=experiments/digits.py',
       f'--workdir={tmp_path}', '--config.learning_rat=0.1'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert ("--config.learning_rat=0.1: experiments/digits.py has no field 'learning_rat'. "
          'Did you mean learning_rate') in result.stderr, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def test_an_empty_workdir_is_refused_before_anything_is_written(tmp_path, digits_config,
                                                                 monkeypatch):
  """An unset shell variable in --workdir=$DIR would train into the current directory."""
  monkeypatch.chdir(tmp_path)
  with pytest.raises(errors.ConfigError, match=r"^--workdir='': empty .*e\.g\. --workdir="):
    train.train_and_evaluate(tiny_config(digits_config), '')
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('config_flag', [['--config=experiments/digit.py'],
                                         ['--config', 'experiments/digit.py']])
def test_cli_names_a_missing_config_file_and_the_one_it_is_near_before_importing_jax(
    tmp_path, config_flag):
  result = subprocess.run(
      [sys.executable, '-X', 'importtime', '-m', 'vgg_jax.main', *config_flag,
       f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.strip().splitlines()
           if not line.startswith('import time:')]
  assert lines == ['FATAL Flags parsing error: --config=experiments/digit.py: no such file. '
                   'Did you mean experiments/digits.py?']
  imported = {line.split('|')[-1].strip() for line in result.stderr.splitlines()
              if line.startswith('import time:')}
  assert not imported & {'jax', 'tensorflow', 'orbax'}, imported & {'jax', 'tensorflow', 'orbax'}


def test_evaluate_names_a_workdir_without_checkpoints_in_one_line(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'vgg_jax.evaluate', f'--workdir={tmp_path}'],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f'vgg_jax.evaluate: {tmp_path}/checkpoints holds no checkpoint: train first with '
      f'python -m vgg_jax.main --workdir={tmp_path}.')


def test_cli_reports_a_bad_config_in_one_line_without_a_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'vgg_jax.main', '--config=experiments/digits.py',
       f'--workdir={tmp_path}', '--config.train_scale=(40, 32)'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      'vgg_jax.main: config.train_scale=(40, 32): Smin=40 > Smax=32'), result.stderr[-2000:]
  assert result.stderr.count('Smin=40 > Smax=32') == 1, result.stderr[-2000:]
