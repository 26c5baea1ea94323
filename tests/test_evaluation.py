"""The test protocol of Sec. 3.2: dense and multi-crop evaluation, scales, counts, paper tables.

References are computed here, independently: the standard (crop) net run window by window,
numpy for the fully-connected head and the soft-max averages, hand-computed crop offsets,
examples read straight from tfds, the paper's numbers typed from its tables.
"""

import contextlib
import functools
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax import default_config
from vgg_jax import errors
from vgg_jax import evaluation
from vgg_jax import input_pipeline
from vgg_jax import models
from vgg_jax import preprocess
from vgg_jax import protocol
from vgg_jax import report
from vgg_jax import steps
from tests.test_train import REPO, run_main

NUM_CLASSES = 7
TRAIN_SIZE = 64  # A 2x2 conv5 grid: fc6 is a 2x2 convolution in dense mode.


def fresh_rng() -> np.random.Generator:
  return np.random.default_rng(int.from_bytes(os.urandom(8), 'little'))


def rel_err(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=('train', 'dense', 'capture_intermediates', 'mutable'))
def apply(model, variables, x, **kwargs):
  """`model.apply`, compiled once per shape: run eagerly, every op compiles on its own."""
  return model.apply(variables, x, **kwargs)


def tiny_net(variant: str = 'A', center_taps_only: bool = False):
  """A 1/16-width net with random weights and random (non-zero) biases.

  center_taps_only zeroes every 3x3 kernel but its centre: each conv5 cell then sees only its
  own 32x32 input cell, so a dense score equals the crop net on its window exactly (with real
  3x3 kernels a window's border sees neighbouring pixels instead of zero padding, Sec. 3.2).
  """
  rng = fresh_rng()
  model = models.VGG(variant, num_classes=NUM_CLASSES, width=1 / 16, init_scheme='glorot')
  params = steps.init_params(model, jax.random.key(rng.integers(2**31)),
                             jnp.zeros((1, TRAIN_SIZE, TRAIN_SIZE, 3)))

  def randomise(path, x):
    name = path[-1].key
    if name == 'bias':
      return jnp.asarray(rng.normal(0, 0.1, x.shape), jnp.float32)
    if center_taps_only and x.ndim == 4 and x.shape[0] == 3:
      return x * jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0)
    return x

  return model, jax.tree_util.tree_map_with_path(randomise, params)


# ---------------------------------------------------------------------------------------------
# The dense (fully-convolutional) net.


@pytest.mark.parametrize('variant', ['A', 'C'])
def test_dense_scores_at_training_size_equal_the_standard_logits(variant):
  model, params = tiny_net(variant)
  x = jnp.asarray(fresh_rng().normal(0, 50, (3, TRAIN_SIZE, TRAIN_SIZE, 3)), jnp.float32)
  logits = apply(model, {'params': params}, x)
  scores = apply(model, {'params': params}, x, dense=True)
  assert scores.shape == (3, 1, 1, NUM_CLASSES)
  assert rel_err(scores[:, 0, 0], logits) <= 1e-5


def test_each_dense_score_is_the_standard_net_on_its_window_at_stride_32():
  model, params = tiny_net(center_taps_only=True)
  x = jnp.asarray(fresh_rng().normal(0, 50, (2, TRAIN_SIZE + 64, TRAIN_SIZE + 96, 3)),
                  jnp.float32)
  scores = apply(model, {'params': params}, x, dense=True)
  assert scores.shape == (2, 3, 4, NUM_CLASSES)
  for r in range(3):
    for c in range(4):
      window = x[:, 32 * r:32 * r + TRAIN_SIZE, 32 * c:32 * c + TRAIN_SIZE]
      assert rel_err(scores[:, r, c], apply(model, {'params': params}, window)) <= 1e-5, (r, c)


def test_dense_head_is_fc6_fc7_fc8_applied_to_every_window_of_conv5_features():
  """Real 3x3 kernels: the head, computed in numpy from conv5_2's output, window by window."""
  model, params = tiny_net()
  x = jnp.asarray(fresh_rng().normal(0, 50, (2, 160, 128, 3)), jnp.float32)
  scores, state = apply(model, {'params': params}, x, dense=True, capture_intermediates=True,
                        mutable=('intermediates',))
  conv5 = np.maximum(np.asarray(state['intermediates']['conv5_2']['__call__'][0], np.float64), 0)
  n, h, w, c = conv5.shape
  pool5 = conv5.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))  # (2, 5, 4, c)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  grid = TRAIN_SIZE // 32
  assert scores.shape == (2, 5 - grid + 1, 4 - grid + 1, NUM_CLASSES)
  for r in range(scores.shape[1]):
    for col in range(scores.shape[2]):
      flat = pool5[:, r:r + grid, col:col + grid].reshape(n, -1)
      fc6 = np.maximum(flat @ p['fc6']['kernel'] + p['fc6']['bias'], 0)
      fc7 = np.maximum(fc6 @ p['fc7']['kernel'] + p['fc7']['bias'], 0)
      expected = fc7 @ p['fc8']['kernel'] + p['fc8']['bias']
      assert rel_err(scores[:, r, col], expected) <= 1e-5, (r, col)


def test_padded_images_with_their_sizes_score_exactly_as_each_image_alone():
  """Real 3x3 kernels: masking every feature map reproduces the unpadded net, border included."""
  model, params = tiny_net()
  rng = fresh_rng()
  sizes = [(64, 64), (70, 150), (127, 97), (160, 160)]
  batch = rng.normal(0, 50, (len(sizes), 160, 160, 3)).astype(np.float32)  # Garbage padding.
  scores = apply(model, {'params': params}, jnp.asarray(batch), dense=True,
                       sizes=jnp.asarray(sizes))
  for i, (h, w) in enumerate(sizes):
    alone = apply(model, {'params': params}, jnp.asarray(batch[i:i + 1, :h, :w]), dense=True)
    rows, cols = alone.shape[1:3]
    assert rel_err(scores[i, :rows, :cols], alone[0]) <= 1e-5, (h, w)


def test_dense_accepts_any_size_and_aspect_at_least_the_training_size():
  model, params = tiny_net()
  for height, width in [(64, 64), (70, 150), (203, 97), (96, 333)]:
    scores = apply(model, {'params': params}, jnp.zeros((1, height, width, 3)), dense=True)
    assert scores.shape == (1, height // 32 - 1, width // 32 - 1, NUM_CLASSES)


def test_dense_refuses_training_mode_and_images_below_the_training_size():
  model, params = tiny_net()
  with pytest.raises(ValueError, match='evaluation only'):
    apply(model, {'params': params}, jnp.zeros((1, 64, 64, 3)), train=True, dense=True)
  with pytest.raises(ValueError, match='at least the training size'):
    apply(model, {'params': params}, jnp.zeros((1, 48, 96, 3)), dense=True)


def test_checkpoint_holds_one_copy_of_fc6():
  model, params = tiny_net()
  assert set(params['fc6']) == {'kernel', 'bias'}
  assert params['fc6']['kernel'].ndim == 2


# ---------------------------------------------------------------------------------------------
# Posteriors of one batch.


@pytest.mark.parametrize('flip', [True, False])
def test_dense_posterior_averages_softmax_of_image_and_flip_over_valid_locations_only(flip):
  """Padded batch vs each image run alone, unpadded; garbage in the padding changes nothing."""
  model, params = tiny_net()
  rng = fresh_rng()
  mean = (120.0, 110.0, 100.0)
  sizes = [(64, 100), (96, 64), (70, 70), (128, 128)]
  batch = rng.integers(0, 256, (len(sizes), 128, 128, 3), dtype=np.uint8)  # Garbage padding.
  probs = evaluation.dense_posteriors(params, jnp.asarray(batch), jnp.asarray(sizes),
                                      model=model,
                                      normalization=preprocess.Normalization(mean), flip=flip)
  for i, (h, w) in enumerate(sizes):
    image = batch[i, :h, :w].astype(np.float32) - np.asarray(mean, np.float32)
    views = (image, image[:, ::-1]) if flip else (image,)
    expected = 0
    for view in views:
      score_map = np.asarray(apply(model, {'params': params}, jnp.asarray(view[None]), dense=True))
      expected = expected + softmax(score_map[0].astype(np.float64).mean(axis=(0, 1))) / len(views)
    assert rel_err(probs[i], expected) <= 1e-5, (h, w)


@pytest.mark.parametrize('flip', [True, False])
def test_multicrop_posterior_averages_softmax_of_25_crops_and_their_flips(flip):
  model, params = tiny_net()
  rng = fresh_rng()
  mean = (123.68, 116.779, 103.939)
  crops = rng.integers(0, 256, (2, 25, TRAIN_SIZE, TRAIN_SIZE, 3), dtype=np.uint8)
  probs = evaluation.multicrop_posteriors(params, jnp.asarray(crops), model=model,
                                          normalization=preprocess.Normalization(mean),
                                          flip=flip)
  for i in range(2):
    views = crops[i].astype(np.float32) - np.asarray(mean, np.float32)
    if flip:
      views = np.concatenate([views, views[:, :, ::-1]])
    assert len(views) == (50 if flip else 25)
    logits = np.asarray(apply(model, {'params': params}, jnp.asarray(views)), np.float64)
    assert rel_err(probs[i], softmax(logits).mean(axis=0)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Test images (tf.data side).


def test_multicrop_is_a_regular_5x5_grid_spanning_the_image(photos):
  photo = photos['chelsea']  # 300 x 451: at Q = 300 no resize is needed.
  crops = input_pipeline.multicrop_test_crops(tf.io.encode_png(photo), scale=300,
                                              image_size=224).numpy()
  tops, lefts = [0, 19, 38, 57, 76], [0, 57, 114, 170, 227]  # i * (L - 224) / 4, rounded.
  assert crops.shape == (25, 224, 224, 3)
  for k, (top, left) in enumerate((t, l) for t in tops for l in lefts):
    expected = photo[top:top + 224, left:left + 224].astype(int)
    assert np.max(np.abs(crops[k].astype(int) - expected)) <= 1, (top, left)


def test_dense_image_is_rescaled_centre_cropped_to_max_aspect_and_padded(photos):
  photo = photos['coffee']  # 400 x 600 -> 100 x 150 at Q = 100.
  image, size = input_pipeline.dense_test_image(tf.io.encode_png(photo), scale=100,
                                                size_step=64, max_aspect=1.2)
  image, size = image.numpy(), size.numpy()
  assert image.shape == (128, 128, 3) and tuple(size) == (100, 120)
  rescaled = input_pipeline.to_uint8(input_pipeline.rescale(tf.constant(photo), 100)).numpy()
  assert rescaled.shape == (100, 150, 3)
  np.testing.assert_array_equal(image[:100, :120], rescaled[:, 15:135])
  assert not image[100:].any() and not image[:, 120:].any()


def test_test_scales_follow_the_paper():
  def config(train_scale, test_scales=()):
    config = default_config.get_config()
    config.update(train_scale=train_scale, test_scales=test_scales)
    return config
  assert protocol.test_scales(config(256)) == (224, 256, 288)
  assert protocol.single_test_scale(config(256)) == 256
  assert protocol.test_scales(config((256, 512))) == (256, 384, 512)
  assert protocol.single_test_scale(config((256, 512))) == 384
  assert protocol.test_scales(config((256, 512), (300, 400))) == (300, 400)
  with pytest.raises(ValueError, match='>= 224'):
    protocol.check_scales((200, 256), 224)


TRACE = '/jax/core/compile/jaxpr_trace_duration'
COMPILE = '/jax/core/compile/backend_compile_duration'


@contextlib.contextmanager
def count_compilations(*kinds: str):
  """Records jax.monitoring's compile events of `kinds` (default: XLA backend compilations)
  inside the block; one served from the persistent compilation cache (conftest) counts too."""
  kinds = kinds or (COMPILE,)
  events = []
  listener = lambda event, duration, **kw: events.append(event) if event in kinds else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_dense_compiles_once_per_shape_bucket_not_per_image(photos_config):
  """13 photos of 11 sizes (aspect up to 3.3) at Q = 64: at most 5 shapes, 5 compilations."""
  config = photos_config
  builder = input_pipeline.get_builder(config)
  model, params = tiny_net()
  model = model.clone(num_classes=3)
  params = steps.init_params(model, jax.random.key(1), jnp.zeros((1, 64, 64, 3)))
  step = evaluation.pmap_posteriors(protocol.DENSE, model,
                                    preprocess.Normalization.from_config(config))
  bound = protocol.dense_shapes_bound(64, config)
  assert bound == 5  # 64x64, 64x96, 96x64, 64x128, 128x64.
  with count_compilations() as compiles:
    post = evaluation.posteriors(step, params, input_pipeline.test_batch_iterator(
        builder, config, protocol.DENSE, 64))
  assert len(post.labels) == 13
  assert 1 < len(compiles) == len(post.shapes) <= bound
  with count_compilations() as again:
    evaluation.posteriors(step, params, input_pipeline.test_batch_iterator(
        builder, config, protocol.DENSE, 64))
  assert not again


def test_multicrop_compiles_once_whatever_the_image_shapes(photos_config):
  builder = input_pipeline.get_builder(photos_config)
  model = models.VGG('A', num_classes=3, width=1 / 16)
  params = steps.init_params(model, jax.random.key(2), jnp.zeros((1, 64, 64, 3)))
  step = evaluation.pmap_posteriors(protocol.MULTICROP, model,
                                    preprocess.Normalization((0.0, 0.0, 0.0)))
  with count_compilations() as compiles:
    post = evaluation.posteriors(step, params, input_pipeline.test_batch_iterator(
        builder, photos_config, protocol.MULTICROP, 80))
  assert len(post.labels) == 13 and len(compiles) == 1


class ScalarRecorder:
  """The part of a metric writer `train.evaluate_protocols` uses."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = dict(scalars)


def test_second_in_training_evaluation_traces_and_compiles_nothing(tmp_path, digits_config):
  """config.eval_protocols, run twice during training: the second reuses every compiled step."""
  from vgg_jax import steps, train  # pylint: disable=g-import-not-at-top
  config = digits_config.copy_and_resolve_references()
  config.variant, config.width, config.eval_split = 'A', 1 / 16, 'test[:48]'
  config.eval_protocols, config.test_scales = 'dense,multicrop', (32, 36)
  builder = input_pipeline.get_builder(config)
  params = steps.init_params(models.create_model(config), jax.random.key(4),
                             jnp.zeros((1, 32, 32, 3)))
  state = types.SimpleNamespace(params=jax.device_put(params,
                                                      steps.replicated_sharding()))
  writer = ScalarRecorder()
  evaluation.pmap_posteriors.cache_clear()  # As in a new run.
  results = []
  for step in (1, 2):
    with count_compilations(TRACE, COMPILE) as compiles:
      results.append(train.evaluate_protocols(state, builder, config, str(tmp_path), step,
                                              writer, final=False))
    if step == 1:  # Dense images at Q = 32 and 36 pad to 2 shapes; all crops share 1.
      assert results[0]['dense']['compilations'] == 2
      assert results[0]['multicrop']['compilations'] == 1
      assert compiles.count(COMPILE) >= 3
    else:
      assert not compiles
  for name in ('dense', 'multicrop'):
    assert results[0][name]['num_examples'] == results[1][name]['num_examples'] == 48
    assert results[1][name]['top1_error'] == results[0][name]['top1_error']
  assert writer.scalars[2] == writer.scalars[1]


# ---------------------------------------------------------------------------------------------
# Every example once, exact counts.


def split_labels(config) -> np.ndarray:
  builder = input_pipeline.get_builder(config)
  ds = builder.as_dataset(split=config.eval_split, shuffle_files=False)
  return np.array([int(ex['label']) for ex in tfds.as_numpy(ds)])


@pytest.mark.parametrize('method,batch', [(protocol.DENSE, 48), (protocol.MULTICROP, 16)])
def test_every_example_is_scored_once_when_the_split_is_not_a_multiple_of_the_batch(
    digits_config, method, batch):
  config = digits_config.copy_and_resolve_references()
  config.train_scale = (32, 36)
  config.dense_batch_size = config.multicrop_batch_size = batch  # 360 = 7 x 48 + 24 = 22 x 16 + 8
  model = models.VGG('A', num_classes=10, width=1 / 16, init_scheme='glorot')
  params = steps.init_params(model, jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  step = evaluation.pmap_posteriors(method, model, preprocess.Normalization.from_config(config))
  post = evaluation.posteriors(step, params, input_pipeline.test_batch_iterator(
      input_pipeline.get_builder(config), config, method, 34))
  np.testing.assert_array_equal(post.labels, split_labels(config))
  np.testing.assert_allclose(post.probs.sum(axis=1), 1.0, rtol=1e-5)
  result = evaluation.error_rates(post)
  top5 = np.argsort(-post.probs, axis=1)[:, :5]
  assert result['num_examples'] == 360
  assert result['top1_error'] == pytest.approx(np.mean(top5[:, 0] != post.labels))
  assert result['top5_error'] == pytest.approx(
      np.mean(~np.any(top5 == post.labels[:, None], axis=1)))


def test_processes_split_the_examples_so_each_is_counted_once(digits_config, monkeypatch):
  """Three simulated hosts: their test batches together hold the split once, in order."""
  config = digits_config.copy_and_resolve_references()
  config.train_scale = (32, 36)
  config.dense_batch_size = 48
  builder = input_pipeline.get_builder(config)
  labels = []
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  for process in range(3):
    monkeypatch.setattr(jax, 'process_index', lambda p=process: p)
    mine = {}
    for batch in input_pipeline.test_batch_iterator(builder, config, protocol.DENSE, 32):
      assert batch['image'].shape[:2] == (8, 2)  # 48 / 3 processes over 8 devices.
      mask = batch['mask'].reshape(-1)
      mine.update(zip(batch['index'].reshape(-1)[mask], batch['label'].reshape(-1)[mask]))
    assert sorted(mine) == list(range(len(mine)))
    labels += [mine[i] for i in range(len(mine))]
  np.testing.assert_array_equal(labels, split_labels(config))


def test_protocols_average_the_right_passes():
  passes = protocol.protocol_passes(protocol.PROTOCOLS, 384, (256, 384, 512))
  assert passes['single'] == [('dense', 384)]
  assert passes['dense'] == [('dense', 256), ('dense', 384), ('dense', 512)]
  assert passes['multicrop'] == [('multicrop', 256), ('multicrop', 384), ('multicrop', 512)]
  assert passes['dense+multicrop'] == passes['dense'] + passes['multicrop']


def test_fusion_averages_posteriors_and_refuses_different_examples():
  rng = fresh_rng()
  labels = rng.integers(0, 5, 40)
  a, b = (evaluation.Posteriors(softmax(rng.normal(size=(40, 5))), labels, 1.0, ())
          for _ in range(2))
  fused = evaluation.fuse([{'dense': a}, {'dense': b}])['dense']
  np.testing.assert_allclose(fused.probs, (a.probs + b.probs) / 2)
  other = evaluation.Posteriors(a.probs, (labels + 1) % 5, 1.0, ())
  with pytest.raises(ValueError, match='different examples'):
    evaluation.fuse([{'dense': a}, {'dense': other}])


def test_unknown_protocol_is_refused_naming_the_valid_ones():
  assert protocol.parse_protocols('all') == protocol.PROTOCOLS
  assert protocol.parse_protocols('dense, multicrop') == ('dense', 'multicrop')
  with pytest.raises(errors.ConfigError, match="--protocol='crops'.*single"):
    protocol.parse_protocols('crops')


# ---------------------------------------------------------------------------------------------
# The paper's numbers beside ours.


def imagenet_config(variant, train_scale):
  config = default_config.get_config()
  config.update(variant=variant, train_scale=train_scale)
  return config


def test_paper_numbers_are_shown_only_for_the_papers_experiment():
  d_jit = imagenet_config('D', (256, 512))
  assert report.paper_result(d_jit, 'single', [384], 'validation') == (25.6, 8.1)
  assert report.paper_result(d_jit, 'dense', [256, 384, 512], 'validation') == (24.8, 7.5)
  assert report.paper_result(d_jit, 'multicrop', [256, 384, 512], 'validation') == (24.6, 7.5)
  assert report.paper_result(d_jit, 'dense+multicrop', [256, 384, 512],
                             'validation') == (24.4, 7.2)
  assert report.paper_result(imagenet_config('A', 256), 'single', [256],
                             'validation') == (29.6, 10.4)
  assert report.paper_result(imagenet_config('C', 384), 'dense', [352, 384, 416],
                             'validation') == (27.8, 9.2)
  # Not the paper's experiment: other scales, another split, a narrower net.
  assert report.paper_result(d_jit, 'dense', [256, 512], 'validation') is None
  assert report.paper_result(d_jit, 'single', [384], 'train') is None
  narrow = imagenet_config('D', (256, 512))
  narrow.width = 0.5
  assert report.paper_result(narrow, 'single', [384], 'validation') is None
  e_jit = imagenet_config('E', (256, 512))
  assert report.paper_fusion_result([d_jit, e_jit], 'dense+multicrop', [[256, 384, 512]] * 2,
                                    'validation') == (23.7, 6.8)


def protocol_results(names, scales, top1=0.25):
  """evaluation.run's results for `names`, as it returns them."""
  return {name: {'top1_error': top1, 'top5_error': top1 / 2, 'num_examples': 360,
                 'scales': [scales[len(scales) // 2]] if name == 'single' else list(scales),
                 'crops_per_image': 1, 'img_per_s': 10.0, 'compilations': 1}
          for name in names}


def test_results_record_split_scales_and_step_and_no_table_mixes_them(tmp_path,
                                                                       digits_config):
  """Every protocol on the test split at step 150, then single on the train split, then dense
  at other scales on the test split at step 200: each entry keeps what it was, and each table
  of results.md holds one split at one step."""
  workdir = str(tmp_path)
  write = lambda results, step, split: report.write(
      workdir, report.annotate(results, digits_config, step, split), 'Evaluation')
  write(protocol_results(protocol.PROTOCOLS, (32, 34, 36)), 150, 'test')
  write(protocol_results(['single'], (32, 34, 36), top1=0.05), 150, 'train')
  write(protocol_results(['dense'], (32, 36), top1=0.5), 200, 'test')

  with open(os.path.join(workdir, 'eval', 'results.json')) as f:
    merged = json.load(f)
  assert {split: sorted(entries) for split, entries in merged.items()} == {
      'test': sorted(protocol.PROTOCOLS), 'train': ['single']}
  for split, entries in merged.items():
    for name, r in entries.items():
      assert (r['split'], r['dataset']) == (split, 'sklearn_digits'), name
  assert (merged['test']['dense']['step'], merged['test']['dense']['scales']) == (200, [32, 36])
  assert (merged['test']['multicrop']['step'], merged['test']['multicrop']['scales']) == (
      150, [32, 34, 36])
  assert merged['train']['single']['top1_error'] == 0.05

  with open(os.path.join(workdir, 'eval', 'results.md')) as f:
    text = f.read()
  tables = {}
  for part in text.split('\n## ')[1:]:
    heading, rows = part.splitlines()[0], [l for l in part.splitlines() if l.startswith('| ')]
    tables[heading] = [row.split(' | ')[0][2:] for row in rows[1:]]
  assert tables == {
      "Split 'test', checkpoint step 200: 360 examples": ['dense (Tables 4, 5)'],
      "Split 'test', checkpoint step 150: 360 examples": [
          'single (Table 3)', 'multicrop (Table 5)', 'dense+multicrop (Table 5)'],
      "Split 'train', checkpoint step 150: 360 examples": ['single (Table 3)']}


# ---------------------------------------------------------------------------------------------
# End to end, from the command line.

TWO_HOST_WORKER = """
import json, os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from vgg_jax import evaluate
results = evaluate.evaluate_workdirs(sys.argv[3], ('single', 'multicrop'), data_dir=sys.argv[4])
print('RESULTS', json.dumps({k: [v['num_examples'], v['top1_error'], v['top5_error']]
                             for k, v in results.items()}))
"""


@pytest.mark.slow
def test_two_hosts_count_every_example_once_and_agree_with_one_host(tmp_path, digits_config):
  """2 processes x 4 CPU devices (gloo) score 100 test digits (50 a host, not a multiple of 4
  devices) exactly as 1 process x 8 does."""
  import socket  # pylint: disable=g-import-not-at-top
  from vgg_jax import evaluate, train  # pylint: disable=g-import-not-at-top
  config = digits_config.copy_and_resolve_references()
  config.train_scale = (32, 36)
  config.variant, config.width, config.num_train_steps = 'A', 1 / 16, 4
  config.init, config.eval_split = 'glorot', 'test[:100]'
  train.train_and_evaluate(config, str(tmp_path))
  one_host = evaluate.evaluate_workdirs(str(tmp_path), ('single', 'multicrop'))
  with socket.socket() as s:
    s.bind(('localhost', 0))
    address = f'localhost:{s.getsockname()[1]}'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  workers = [subprocess.Popen([sys.executable, '-c', TWO_HOST_WORKER, address, str(i),
                               str(tmp_path), config.data_dir], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  for worker in workers:
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-3000:]
    line = next(l for l in out.splitlines() if l.startswith('RESULTS '))
    two_hosts = json.loads(line[len('RESULTS '):])
    for name, (count, top1, top5) in two_hosts.items():
      assert count == 100
      assert top1 == pytest.approx(one_host[name]['top1_error'], abs=1e-9)
      assert top5 == pytest.approx(one_host[name]['top5_error'], abs=1e-9)


def run_evaluate(*args) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run([sys.executable, '-m', 'vgg_jax.evaluate', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def tensorboard_scalars(workdir, tag: str) -> dict[int, float]:
  directory = os.path.join(workdir, 'tensorboard')
  values = {}
  for name in os.listdir(directory):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


@pytest.mark.slow
def test_train_briefly_then_evaluate_every_protocol_and_fuse_two_nets(tmp_path, digits_config):
  """Issue check 9: two short digits runs, every protocol, fusion; results.json is sane."""
  net_a, net_b = str(tmp_path / 'a'), str(tmp_path / 'b')
  test_split = '--config.eval_split=test[:120]'  # A third of the test split: the test's cost.
  run_main(net_a, digits_config.data_dir, '--config.num_train_steps=150', test_split,
           '--config.eval_protocols=single,dense', '--config.eval_protocols_every_steps=75')
  # During training: the protocols ran at steps 75 and 150, in TensorBoard and results.json.
  assert set(tensorboard_scalars(net_a, 'test/dense/top1_error')) == {75, 150}
  with open(os.path.join(net_a, 'eval', 'results.json')) as f:
    assert set(json.load(f)['test[:120]']) == {'single', 'dense'}
  # A weak second net (40 steps) is enough for fusion's bookkeeping.
  run_main(net_b, digits_config.data_dir, '--config.num_train_steps=40', test_split,
           '--config.seed=1', '--config.variant=A')

  log = run_evaluate(f'--workdir={net_a}', '--protocol=all', f'--fuse={net_b}').stderr
  with open(os.path.join(net_a, 'eval', 'results.json')) as f:
    results = json.load(f)['test[:120]']
  protocols = ('single', 'dense', 'multicrop', 'dense+multicrop')
  assert set(results) == {*protocols, *(f'fused:{p}' for p in protocols)}
  # The digits are tested without flips (config.test_flip=False): 1 view per dense pass.
  crops = {'single': 1, 'dense': 3, 'multicrop': 75, 'dense+multicrop': 78}
  for name, r in results.items():
    protocol = name.split(':')[-1]
    assert r['num_examples'] == 120
    assert 0.0 <= r['top5_error'] <= r['top1_error'] < 0.5, name  # Chance is 0.9.
    assert r['scales'] == ([34] if protocol == 'single' else [32, 34, 36])
    assert r['img_per_s'] > 0 and r['paper'] is None
    if not name.startswith('fused:'):
      assert r['crops_per_image'] == crops[protocol] and r['step'] == 150
      assert r['net'] == 'D x0.125'
  fused = results['fused:dense+multicrop']
  assert fused['nets'] == [net_a, net_b] and fused['net'] == 'D x0.125+A x0.125'
  assert fused['members'][net_b]['top1_error'] >= 0
  with open(os.path.join(net_a, 'eval', 'results.md')) as f:
    table = f.read()
  # A table of net A's results at step 150, one of the fused nets' (steps 150 and 40).
  assert table.count('\n| ') == 2 + len(results)  # Headers and one row per result.
  for words in ('dense Q=36', 'multicrop Q=32', 'img/s', 'ETA', 'Fused dense+multicrop'):
    assert words in log

  # --scales overrides the paper's scales; the other protocols' results are kept.
  run_evaluate(f'--workdir={net_a}', '--protocol=dense', '--scales=32,36')
  with open(os.path.join(net_a, 'eval', 'results.json')) as f:
    rerun = json.load(f)['test[:120]']
  assert set(rerun) == set(results)
  assert rerun['dense']['scales'] == [32, 36] and rerun['dense']['crops_per_image'] == 2
  assert rerun['multicrop'] == results['multicrop']
