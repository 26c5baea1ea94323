"""The VGG module against Table 1 / Table 2 and against Keras' independent VGG16 / VGG19."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import models

# Table 2 of the paper: parameters at 1000 classes, biases included.
TABLE2 = {'A': 132_863_336, 'A-LRN': 132_863_336, 'B': 133_047_848, 'C': 133_638_952,
          'D': 138_357_544, 'E': 143_667_240}
# Table 1, written out layer by layer: (name, kernel size, output channels).
TABLE1 = {
    'A': '1_1:3:64 2_1:3:128 3_1:3:256 3_2:3:256 4_1:3:512 4_2:3:512 5_1:3:512 5_2:3:512',
    'B': '1_1:3:64 1_2:3:64 2_1:3:128 2_2:3:128 3_1:3:256 3_2:3:256 4_1:3:512 4_2:3:512 '
         '5_1:3:512 5_2:3:512',
    'C': '1_1:3:64 1_2:3:64 2_1:3:128 2_2:3:128 3_1:3:256 3_2:3:256 3_3:1:256 4_1:3:512 '
         '4_2:3:512 4_3:1:512 5_1:3:512 5_2:3:512 5_3:1:512',
    'D': '1_1:3:64 1_2:3:64 2_1:3:128 2_2:3:128 3_1:3:256 3_2:3:256 3_3:3:256 4_1:3:512 '
         '4_2:3:512 4_3:3:512 5_1:3:512 5_2:3:512 5_3:3:512',
    'E': '1_1:3:64 1_2:3:64 2_1:3:128 2_2:3:128 3_1:3:256 3_2:3:256 3_3:3:256 3_4:3:256 '
         '4_1:3:512 4_2:3:512 4_3:3:512 4_4:3:512 5_1:3:512 5_2:3:512 5_3:3:512 5_4:3:512',
}
TABLE1['A-LRN'] = TABLE1['A']


def fresh_rng() -> np.random.Generator:
  return np.random.default_rng(int.from_bytes(os.urandom(4), 'little'))


def param_shapes(model, size=224):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return jax.tree.map(lambda x: x.shape, variables['params'])


@pytest.mark.parametrize('variant', models.VARIANTS)
def test_parameter_count_matches_table2(variant):
  shapes = param_shapes(models.VGG(variant=variant, num_classes=1000))
  assert sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(
      x, tuple))) == TABLE2[variant]


@pytest.mark.parametrize('variant', models.VARIANTS)
def test_param_tree_reads_like_table1(variant):
  shapes = param_shapes(models.VGG(variant=variant))
  expected, in_channels = {}, 3
  for entry in TABLE1[variant].split():
    name, size, channels = entry.split(':')
    expected[f'conv{name}'] = (int(size), int(size), in_channels, int(channels))
    in_channels = int(channels)
  expected.update({'fc6': (7 * 7 * 512, 4096), 'fc7': (4096, 4096), 'fc8': (4096, 1000)})
  assert list(shapes) == list(expected)
  assert {name: s['kernel'] for name, s in shapes.items()} == expected
  assert list(models.layer_names(variant)) == list(expected)


def test_lrn_is_alexnets_formula_as_tensorflow_computes_it():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x = fresh_rng().normal(scale=30.0, size=(2, 5, 5, 16)).astype(np.float32)
  reference = tf.nn.local_response_normalization(x, depth_radius=2, bias=2.0, alpha=1e-4,
                                                 beta=0.75).numpy()
  got = np.asarray(models.local_response_norm(jnp.asarray(x)))
  np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(reference - x / 2.0 ** 0.75)) > 1e-3  # The sum term matters here.


def test_a_lrn_normalises_conv1_1_and_otherwise_is_net_a():
  rng = fresh_rng()
  x = jnp.asarray(rng.normal(scale=50.0, size=(2, 32, 32, 3)), jnp.float32)
  a = models.VGG('A', width=0.125, init_scheme='glorot')
  a_lrn = models.VGG('A-LRN', width=0.125, init_scheme='glorot')
  params = a.init(jax.random.key(1), x)['params']
  # By hand: conv1_1, ReLU, LRN, pool, then net A's conv2_1 on it.
  conv = lambda y, layer: jax.lax.conv_general_dilated(
      y, params[layer]['kernel'], (1, 1), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + params[layer]['bias']
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  lrn = tf.nn.local_response_normalization(np.asarray(jax.nn.relu(conv(x, 'conv1_1'))),
                                           depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75)
  pooled = tf.nn.max_pool2d(lrn, 2, 2, 'VALID').numpy()
  _, inter = a_lrn.apply({'params': params}, x, capture_intermediates=True)
  np.testing.assert_allclose(inter['intermediates']['conv2_1']['__call__'][0],
                             conv(pooled, 'conv2_1'), rtol=1e-4, atol=1e-4)
  assert not np.allclose(a.apply({'params': params}, x), a_lrn.apply({'params': params}, x))


def keras_to_flax(keras_model) -> dict:
  """Keras' layer names -> the paper's; kernels are HWIO / (in, out) in both frameworks."""
  params = {}
  for layer in keras_model.layers:
    weights = layer.get_weights()
    if not weights:
      continue
    if layer.name.startswith('block'):
      block, conv = layer.name[len('block'):].split('_conv')
      name = f'conv{block}_{conv}'
    else:
      name = {'fc1': 'fc6', 'fc2': 'fc7', 'predictions': 'fc8'}[layer.name]
    params[name] = {'kernel': jnp.asarray(weights[0]), 'bias': jnp.asarray(weights[1])}
  return params


@pytest.mark.parametrize('variant,application', [('D', 'VGG16'), ('E', 'VGG19')])
def test_forward_matches_keras(variant, application):
  """Same random weights, same logits as keras.applications, relative error <= 1e-5.

  At 64x64 fc6 sees a 2x2x512 map, so a wrong flatten order would show.
  """
  import keras  # pylint: disable=g-import-not-at-top
  rng = fresh_rng()
  keras_model = getattr(keras.applications, application)(
      weights=None, include_top=True, input_shape=(64, 64, 3), classes=10,
      classifier_activation=None)
  # He-scaled weights and random biases keep activations O(1) through 19 layers.
  keras_model.set_weights([
      rng.normal(scale=np.sqrt(2.0 / np.prod(w.shape[:-1])) if w.ndim > 1 else 0.1,
                 size=w.shape).astype(np.float32) for w in keras_model.get_weights()])
  x = rng.uniform(-1, 1, size=(2, 64, 64, 3)).astype(np.float32)
  reference = np.asarray(keras_model(x, training=False))
  ours = models.VGG(variant=variant, num_classes=10).apply(
      {'params': keras_to_flax(keras_model)}, jnp.asarray(x), train=False)
  assert np.abs(reference).max() > 1e-2
  assert np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)) <= 1e-5


def test_bfloat16_computes_in_bf16_with_float32_params_and_logits():
  x = jnp.asarray(fresh_rng().normal(size=(2, 32, 32, 3)), jnp.float32)
  f32 = models.VGG('B', num_classes=10, width=0.125, init_scheme='glorot')
  bf16 = models.VGG('B', num_classes=10, width=0.125, init_scheme='glorot', dtype=jnp.bfloat16)
  variables = bf16.init(jax.random.key(0), x)
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  _, inter = bf16.apply(variables, x, capture_intermediates=True)
  assert inter['intermediates']['conv3_2']['__call__'][0].dtype == jnp.bfloat16
  low, high = bf16.apply(variables, x), f32.apply(variables, x)
  assert low.dtype == jnp.float32
  assert 0 < np.max(np.abs(low - high)) <= 5e-2 * np.max(np.abs(high))


@pytest.mark.parametrize('size', [32, 64, 96])
def test_any_multiple_of_32_trains_with_fc6_sized_to_the_grid(size):
  model = models.VGG('A', num_classes=7, width=0.25)
  shapes = param_shapes(model, size)
  assert shapes['fc6']['kernel'] == ((size // 32) ** 2 * 128, 1024)
  logits = model.apply(model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))),
                       jnp.zeros((3, size, size, 3)))
  assert logits.shape == (3, 7)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match='multiples of 32'):
    models.VGG('A', width=0.125).init(jax.random.key(0), jnp.zeros((1, 48, 48, 3)))
  with pytest.raises(ValueError, match="variant='F'.*A, A-LRN, B, C, D, E"):
    models.VGG('F').init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="init='he'"):
    models.kernel_init('he')


def test_paper_init_draws_weights_with_std_0_01_and_zero_biases():
  model = models.VGG('A', num_classes=1000, width=0.5, init_scheme='paper', init_std=0.01)
  params = model.init(jax.random.key(int.from_bytes(os.urandom(3), 'little')),
                      jnp.zeros((1, 32, 32, 3)))['params']
  for name in ('conv3_1', 'conv5_2', 'fc6', 'fc7'):
    kernel = np.asarray(params[name]['kernel'])
    assert abs(kernel.std() - 0.01) < 0.03 * 0.01, name
    assert abs(kernel.mean()) < 1e-3 * 0.1, name
  assert all(not np.any(np.asarray(p['bias'])) for p in params.values())


def test_glorot_init_has_variance_two_over_fan_in_plus_fan_out():
  model = models.VGG('A', num_classes=1000, width=0.5, init_scheme='glorot')
  params = model.init(jax.random.key(int.from_bytes(os.urandom(3), 'little')),
                      jnp.zeros((1, 32, 32, 3)))['params']
  for name in ('conv4_1', 'fc7'):
    kernel = np.asarray(params[name]['kernel'])
    receptive = int(np.prod(kernel.shape[:-2]))
    fan_in, fan_out = receptive * kernel.shape[-2], receptive * kernel.shape[-1]
    assert kernel.var() == pytest.approx(2.0 / (fan_in + fan_out), rel=0.03), name


def test_dropout_is_training_only_and_keyed():
  model = models.VGG('A', num_classes=10, width=0.125, init_scheme='glorot')
  x = jnp.asarray(fresh_rng().normal(size=(4, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  evaluation = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(evaluation, model.apply(variables, x))
  with pytest.raises(Exception, match='dropout'):
    model.apply(variables, x, train=True)
  one = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})
  two = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(one, two) and not np.allclose(one, evaluation)
  no_dropout = models.VGG('A', num_classes=10, width=0.125, init_scheme='glorot',
                          dropout_rate=0.0)
  np.testing.assert_allclose(
      no_dropout.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)}),
      evaluation, rtol=1e-6)


def test_width_scales_conv_and_fc_channels():
  shapes = param_shapes(models.VGG('D', width=0.25), 32)
  assert shapes['conv1_1']['kernel'][-1] == 16 and shapes['conv5_3']['kernel'][-1] == 128
  assert shapes['fc6']['kernel'] == (128, 1024) and shapes['fc8']['kernel'] == (1024, 1000)
