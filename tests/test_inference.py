"""The notebook API: load, InputTransform, features, predict (vgg_jax.inference)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import vgg_jax
from vgg_jax import checkpoints
from vgg_jax import default_config
from vgg_jax import input_pipeline
from vgg_jax import models
from vgg_jax import preprocess
from vgg_jax import run_files
from vgg_jax.inference import InputTransform

SIZE = 64


def fresh_rng() -> np.random.Generator:
  return np.random.default_rng(int.from_bytes(os.urandom(4), 'little'))


def tiny_net(variant='B', num_classes=6):
  """A 1/16-width net with random weights that keep activations O(1) (He-scaled)."""
  model = models.VGG(variant=variant, num_classes=num_classes, width=1 / 16, dropout_rate=0.5)
  params = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))['params']
  rng = fresh_rng()
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: (rng.normal(0, np.sqrt(2 / np.prod(p.shape[:-1])), p.shape)
                       if path[-1].key == 'kernel' else rng.normal(0, 0.1, p.shape))
      .astype(np.float32), params)
  return model, {'params': params}


def numpy_conv_relu(x, kernel, bias):
  k = kernel.shape[0]
  padded = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(1, 2))
  return np.maximum(np.einsum('nhwcij,ijcf->nhwf', windows, kernel) + bias, 0)


def numpy_pool(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def test_features_are_the_papers_layers_after_relu_and_chain_to_the_logits():
  model, variables = tiny_net()
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  x = fresh_rng().standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
  names = ('conv1_1', 'conv1_2', 'pool1', 'conv5_2', 'pool5', 'fc6', 'fc7', 'fc8')
  f = {k: np.asarray(v, np.float64) for k, v in
       vgg_jax.features(model, variables, jnp.asarray(x), layers=names).items()}
  assert list(f) == list(names)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
  conv1_1 = numpy_conv_relu(x.astype(np.float64), p['conv1_1']['kernel'], p['conv1_1']['bias'])
  close(f['conv1_1'], conv1_1)
  close(f['conv1_2'], numpy_conv_relu(conv1_1, p['conv1_2']['kernel'], p['conv1_2']['bias']))
  close(f['pool1'], numpy_pool(f['conv1_2']))
  assert f['conv5_2'].shape == (2, SIZE // 16, SIZE // 16, 32) and f['conv5_2'].min() >= 0
  close(f['pool5'], numpy_pool(f['conv5_2']))  # Net B's block 5 ends with conv5_2.
  fc6 = np.maximum(f['pool5'].reshape(2, -1) @ p['fc6']['kernel'] + p['fc6']['bias'], 0)
  close(f['fc6'], fc6)
  close(f['fc7'], np.maximum(fc6 @ p['fc7']['kernel'] + p['fc7']['bias'], 0))
  assert f['fc7'].shape == (2, 256)
  close(f['fc8'], f['fc7'] @ p['fc8']['kernel'] + p['fc8']['bias'])
  close(f['fc8'], np.asarray(model.apply(variables, jnp.asarray(x)), np.float64))


def test_features_refuse_a_layer_the_net_does_not_have():
  model, variables = tiny_net(variant='A')
  with pytest.raises(ValueError, match='No layer conv1_2 in net A'):
    vgg_jax.features(model, variables, jnp.zeros((1, SIZE, SIZE, 3)), layers=('conv1_2',))


def test_preprocess_rescales_to_q_crops_the_centre_and_normalises_like_the_input_pipeline(
    photos):
  norm = preprocess.Normalization((120.0, 110.0, 100.0), (50.0, 60.0, 70.0), 'BGR')
  prep = InputTransform(norm, image_size=SIZE, scale=80)
  photo = photos['coffee']  # 400 x 600
  rescaled = prep.rescale(photo)
  assert rescaled.shape == (80, 120, 3)
  expected = input_pipeline.to_uint8(input_pipeline.rescale(tf.constant(photo), 80)).numpy()
  assert np.abs(rescaled.astype(float) - expected).mean() < 1.0
  x = np.asarray(prep([photo, photos['coffee_portrait']]))
  assert x.shape == (2, SIZE, SIZE, 3)
  crop = rescaled[8:8 + SIZE, 28:28 + SIZE].astype(np.float64)
  np.testing.assert_allclose(x[0], ((crop - norm.mean_rgb) / norm.std_rgb)[..., ::-1], atol=1e-4)


def softmax(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def test_predict_scores_any_size_densely_and_names_the_top_k(photos):
  model, variables = tiny_net(num_classes=6)
  norm = preprocess.Normalization(std_rgb=(64.0, 64.0, 64.0))  # Unit inputs for He weights.
  prep = InputTransform(norm, image_size=SIZE, scale=96)
  names = [f'class {i}' for i in range(6)]
  photo = photos['chelsea']  # 300 x 451 -> 96 x 144
  (top,) = vgg_jax.predict(model, variables, photo, prep, k=4, class_names=names)
  rescaled = prep.rescale(photo)
  x = jnp.asarray((rescaled[None].astype(np.float32) - np.asarray(norm.mean_rgb, np.float32))
                  / 64)
  score_map = np.asarray(model.apply(variables, x, dense=True), np.float64)[0]
  assert score_map.shape[:2] == (96 // 32 - 1, 144 // 32 - 1)
  expected = softmax(score_map.mean(axis=(0, 1)))
  labels = [t['label'] for t in top]
  probabilities = np.array([t['probability'] for t in top])
  # The k most probable (ties, e.g. probabilities that underflow to 0, in any order).
  assert len(set(labels)) == 4 and expected[labels].min() >= np.sort(expected)[-4] - 1e-6
  np.testing.assert_allclose(probabilities, expected[labels], rtol=1e-4, atol=1e-7)
  assert np.all(np.diff(probabilities) <= 0) and labels[0] == np.argmax(expected)
  assert [t['name'] for t in top] == [names[i] for i in labels]


def test_predict_reads_grey_and_transparent_images_as_the_training_pipeline_does(photos):
  """Grey is repeated to RGB (tf.io.decode_image); alpha is composited on white (PIL, as
  image_folder's preparation does)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  model, variables = tiny_net(num_classes=6)
  prep = InputTransform(preprocess.Normalization(std_rgb=(64.0, 64.0, 64.0)), SIZE,
                        scale=96)
  predict = lambda image: vgg_jax.predict(model, variables, image, prep, k=6)[0]
  photo = photos['chelsea']
  grey = np.asarray(Image.fromarray(photo).convert('L'))
  decoded = tf.io.decode_image(tf.io.encode_png(grey[..., None]), channels=3).numpy()
  alpha = np.tile(np.linspace(0, 255, photo.shape[1]).astype(np.uint8), (photo.shape[0], 1))
  rgba = np.concatenate([photo, alpha[..., None]], axis=-1)
  white = Image.new('RGBA', (photo.shape[1], photo.shape[0]), (255, 255, 255, 255))
  on_white = np.asarray(Image.alpha_composite(white, Image.fromarray(rgba)).convert('RGB'))
  assert predict(grey) == predict(grey[..., None]) == predict(decoded)
  assert predict(rgba) == predict(on_white)
  opaque = np.concatenate([photo, np.full_like(photo[..., :1], 255)], axis=-1)
  assert predict(opaque) == predict(photo)
  assert predict(np.stack([grey, alpha], axis=-1)) == predict(
      np.asarray(Image.alpha_composite(white, Image.fromarray(rgba).convert('LA').convert(
          'RGBA')).convert('RGB')))
  with pytest.raises(ValueError, match=r'C = 1 \(grey\).*got shape \(300, 451, 5\)'):
    predict(np.zeros((300, 451, 5), np.uint8))


def test_load_gives_the_checkpoints_net_parameters_and_normalisation(tmp_path):
  model, variables = tiny_net(variant='C', num_classes=4)
  config = default_config.get_config()
  config.update(variant='C', width=1 / 16, num_classes=4, image_size=SIZE, train_scale=(64, 96),
                std_rgb=(2.0, 3.0, 4.0), channel_order='BGR')
  checkpoints.save_params(str(tmp_path), variables['params'], config)
  run_files.write_class_names(str(tmp_path), ['a', 'b', 'c', 'd'])
  loaded_model, loaded, prep = vgg_jax.load(str(tmp_path))
  assert (loaded_model.variant, loaded_model.num_classes, loaded_model.width) == ('C', 4, 1 / 16)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  assert prep == InputTransform(
      preprocess.Normalization(config.mean_rgb, (2.0, 3.0, 4.0), 'BGR'), SIZE, 80,
      test_scales=(64, 80, 96))
  assert vgg_jax.class_names(str(tmp_path)) == ['a', 'b', 'c', 'd']
  # Appendix B's descriptors default to the net's test scales, Smin, the middle and Smax.
  image = fresh_rng().integers(0, 256, (70, 90, 3), dtype=np.uint8)
  np.testing.assert_array_equal(
      vgg_jax.descriptors(loaded_model, loaded, image, prep),
      vgg_jax.descriptors(loaded_model, loaded, image, prep, scales=(64, 80, 96)))


def numpy_fc7_descriptor(pool5, params, grid):
  """fc6 on every grid x grid window of a pool5 map (flattened h, w, C), then fc7, both with
  ReLU, averaged over the windows: Appendix B's descriptor written out by hand."""
  fc6, fc7 = params['fc6'], params['fc7']
  rows, cols = pool5.shape[0] - grid + 1, pool5.shape[1] - grid + 1
  out = []
  for r in range(rows):
    for c in range(cols):
      h6 = np.maximum(pool5[r:r + grid, c:c + grid].reshape(-1) @ fc6['kernel'] + fc6['bias'], 0)
      out.append(np.maximum(h6 @ fc7['kernel'] + fc7['bias'], 0))
  return np.mean(out, axis=0)


@pytest.mark.parametrize('aggregate', ['average', 'stack'])
def test_descriptors_average_fc7_over_windows_flips_and_scales_then_l2_normalise(aggregate):
  """Appendix B: the net applied densely at each Q, fc7 averaged over locations and the mirror
  image, the scales averaged or stacked, L2-normalised. The reference slides fc6 and fc7 over
  pool5 in numpy; a 96 x 128 image at Q = 96 has 2 x 3 windows of 64, at Q = 128 3 x 4."""
  model, variables = tiny_net()
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), variables['params'])
  image = fresh_rng().integers(0, 256, (96, 128, 3), dtype=np.uint8)
  norm = preprocess.Normalization((120.0, 110.0, 100.0), (60.0, 60.0, 60.0), 'RGB')
  prep = InputTransform(norm, SIZE, 96)
  got = vgg_jax.descriptors(model, variables, [image], prep, scales=(100, 128),
                            aggregate=aggregate, flip=True)
  per_scale = []
  for q in (100, 128):
    views = []
    for view in (image, image[:, ::-1]):
      x = InputTransform(norm, SIZE, q).rescale(view)
      pool5 = vgg_jax.features(model, variables, norm(jnp.asarray(x[None]), jnp.float32),
                               layers=('pool5',), dense=True)['pool5'][0]
      views.append(numpy_fc7_descriptor(np.asarray(pool5, np.float64), params, SIZE // 32))
    per_scale.append(np.mean(views, axis=0))
  joined = np.mean(per_scale, axis=0) if aggregate == 'average' else np.concatenate(per_scale)
  expected = joined / np.linalg.norm(joined)
  assert got.shape == (1, expected.size)
  np.testing.assert_allclose(got[0], expected, rtol=1e-3, atol=2e-5)  # float32 vs float64.
  assert np.linalg.norm(got[0]) == pytest.approx(1.0, rel=1e-5)
