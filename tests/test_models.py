"""`vgg_jax.models.VGG` against Simonyan & Zisserman (ICLR 2015), TensorFlow and Keras.

Every expectation here comes from outside the module: the paper's Tables 1 and 2 written out by
hand, TensorFlow's LRN, Keras' own VGG16 / VGG19, or a closed-form statistic.
"""

import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import models
from vgg_jax import ops


def fresh_rng() -> np.random.Generator:
  return np.random.default_rng(int.from_bytes(os.urandom(8), 'little'))


def fresh_key() -> jax.Array:
  return jax.random.key(int.from_bytes(os.urandom(4), 'little'))


def param_shapes(model, height=224, width=None):
  """The parameter shapes of `model.init`, traced with `jax.eval_shape` so nothing is allocated."""
  x = jax.ShapeDtypeStruct((1, height, width or height, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.tree.map(lambda leaf: tuple(leaf.shape), variables['params'])


def random_params(model, height=32, width=None, rng=None):
  """He-normal kernels (std sqrt(2 / fan_in)) and N(0, 0.1) biases from numpy, shaped by `model`.

  Drawn here rather than by `model.init`, so forward tests neither depend on nor wait for it.
  """
  rng = rng or fresh_rng()
  def draw(path, shape):
    if path[-1].key == 'bias':
      return jnp.asarray(rng.normal(0.0, 0.1, size=shape), jnp.float32)
    fan_in = int(np.prod(shape[:-1]))
    return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(
      draw, param_shapes(model, height, width), is_leaf=lambda leaf: isinstance(leaf, tuple))


def fast_init(model, height=32):
  """`model.init` under jit with an RBG key: the initialisers' distributions do not depend on the
  key's implementation, and this compiles several times faster on CPU than threefry."""
  key = jax.random.key(int.from_bytes(os.urandom(4), 'little'), impl='rbg')
  return jax.jit(model.init)(key, jnp.zeros((1, height, height, 3)))['params']


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# Table 1, column by column, in the paper's own notation ("conv<receptive field>-<channels>").
TABLE1 = {
    'A': {
        'conv1_1': 'conv3-64',
        'conv2_1': 'conv3-128',
        'conv3_1': 'conv3-256', 'conv3_2': 'conv3-256',
        'conv4_1': 'conv3-512', 'conv4_2': 'conv3-512',
        'conv5_1': 'conv3-512', 'conv5_2': 'conv3-512',
    },
    'B': {
        'conv1_1': 'conv3-64', 'conv1_2': 'conv3-64',
        'conv2_1': 'conv3-128', 'conv2_2': 'conv3-128',
        'conv3_1': 'conv3-256', 'conv3_2': 'conv3-256',
        'conv4_1': 'conv3-512', 'conv4_2': 'conv3-512',
        'conv5_1': 'conv3-512', 'conv5_2': 'conv3-512',
    },
    'C': {
        'conv1_1': 'conv3-64', 'conv1_2': 'conv3-64',
        'conv2_1': 'conv3-128', 'conv2_2': 'conv3-128',
        'conv3_1': 'conv3-256', 'conv3_2': 'conv3-256', 'conv3_3': 'conv1-256',
        'conv4_1': 'conv3-512', 'conv4_2': 'conv3-512', 'conv4_3': 'conv1-512',
        'conv5_1': 'conv3-512', 'conv5_2': 'conv3-512', 'conv5_3': 'conv1-512',
    },
    'D': {
        'conv1_1': 'conv3-64', 'conv1_2': 'conv3-64',
        'conv2_1': 'conv3-128', 'conv2_2': 'conv3-128',
        'conv3_1': 'conv3-256', 'conv3_2': 'conv3-256', 'conv3_3': 'conv3-256',
        'conv4_1': 'conv3-512', 'conv4_2': 'conv3-512', 'conv4_3': 'conv3-512',
        'conv5_1': 'conv3-512', 'conv5_2': 'conv3-512', 'conv5_3': 'conv3-512',
    },
    'E': {
        'conv1_1': 'conv3-64', 'conv1_2': 'conv3-64',
        'conv2_1': 'conv3-128', 'conv2_2': 'conv3-128',
        'conv3_1': 'conv3-256', 'conv3_2': 'conv3-256', 'conv3_3': 'conv3-256',
        'conv3_4': 'conv3-256',
        'conv4_1': 'conv3-512', 'conv4_2': 'conv3-512', 'conv4_3': 'conv3-512',
        'conv4_4': 'conv3-512',
        'conv5_1': 'conv3-512', 'conv5_2': 'conv3-512', 'conv5_3': 'conv3-512',
        'conv5_4': 'conv3-512',
    },
}
TABLE1['A-LRN'] = TABLE1['A']  # A-LRN only adds a parameter-free LRN after conv1_1.
# The header row of Table 1: "11 weight layers" ... "19 weight layers".
DEPTH = {'A': 11, 'A-LRN': 11, 'B': 13, 'C': 16, 'D': 16, 'E': 19}
# Table 2: number of parameters (1000 ImageNet classes, biases included).
TABLE2 = {'A': 132_863_336, 'A-LRN': 132_863_336, 'B': 133_047_848, 'C': 133_638_952,
          'D': 138_357_544, 'E': 143_667_240}


# 1. Table 2.

@pytest.mark.parametrize('variant', sorted(TABLE2))
def test_parameter_count_matches_table2(variant):
  """Table 2 counts every weight and bias of the 1000-class net at 224x224 (7x7x512 into fc6)."""
  shapes = param_shapes(models.VGG(variant=variant, num_classes=1000, width=1.0))
  leaves = jax.tree.leaves(shapes, is_leaf=lambda leaf: isinstance(leaf, tuple))
  assert sum(int(np.prod(shape)) for shape in leaves) == TABLE2[variant]


# 2. Table 1.

@pytest.mark.parametrize('variant', sorted(TABLE1))
def test_param_tree_reads_like_table1(variant):
  """Layers named as in the paper (conv3_2, fc6), 3x3 kernels (1x1 in C), 64-128-256-512-512."""
  expected_names = list(TABLE1[variant]) + ['fc6', 'fc7', 'fc8']
  assert len(expected_names) == DEPTH[variant]
  assert list(models.layer_names(variant)) == expected_names

  shapes = param_shapes(models.VGG(variant=variant, num_classes=1000))
  assert set(shapes) == set(expected_names)
  in_channels = 3
  for name, notation in TABLE1[variant].items():
    size, channels = (int(part) for part in notation[len('conv'):].split('-'))
    expected = {'kernel': (size, size, in_channels, channels), 'bias': (channels,)}
    assert shapes[name] == expected, name
    in_channels = channels
  assert shapes['fc6'] == {'kernel': (7 * 7 * 512, 4096), 'bias': (4096,)}
  assert shapes['fc7'] == {'kernel': (4096, 4096), 'bias': (4096,)}
  assert shapes['fc8'] == {'kernel': (4096, 1000), 'bias': (1000,)}


def test_net_c_has_1x1_convolutions_closing_blocks_3_to_5():
  """Sec. 2.2: C adds 1x1 conv layers (conv3_3, conv4_3, conv5_3) -- D has 3x3 ones there."""
  c_shapes = param_shapes(models.VGG(variant='C'))
  d_shapes = param_shapes(models.VGG(variant='D'))
  for name, channels in (('conv3_3', 256), ('conv4_3', 512), ('conv5_3', 512)):
    assert c_shapes[name]['kernel'] == (1, 1, channels, channels)
    assert d_shapes[name]['kernel'] == (3, 3, channels, channels)
  one_by_one = sorted(name for name, p in c_shapes.items() if p['kernel'][:2] == (1, 1))
  assert one_by_one == ['conv3_3', 'conv4_3', 'conv5_3']


# 3. A-LRN.

def tf_lrn(x):
  """AlexNet's LRN as TensorFlow computes it: depth radius 2 (n=5), k=2, alpha=1e-4, beta=0.75."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.nn.local_response_normalization(
      np.asarray(x, np.float32), depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75).numpy()


@pytest.mark.parametrize('channels', [3, 64])
def test_local_response_norm_matches_tensorflow(channels):
  """Sec. 2.1: A-LRN uses Krizhevsky et al.'s LRN; alpha multiplies the plain sum of squares."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x = fresh_rng().normal(0.0, 30.0, size=(2, 5, 7, channels)).astype(np.float32)
  expected = tf_lrn(x)
  # The data is large enough that the normalisation is not a mere constant rescaling, and that
  # Caffe's alpha / n convention would give visibly different numbers.
  assert relative_error(x / 2.0 ** 0.75, expected) > 0.05
  caffe = tf.nn.local_response_normalization(x, 2, bias=2.0, alpha=1e-4 / 5, beta=0.75).numpy()
  assert relative_error(caffe, expected) > 0.05

  actual = models.local_response_norm(jnp.asarray(x))
  assert actual.dtype == jnp.float32
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def a_lrn_inputs():
  """Random params for A with conv1_1 scaled up so LRN's denominator is far from k, and a batch."""
  rng = fresh_rng()
  x = jnp.asarray(rng.uniform(-1.0, 1.0, size=(2, 32, 32, 3)), jnp.float32)
  params = random_params(models.VGG(variant='A', width=0.125, num_classes=10), rng=rng)
  params['conv1_1']['kernel'] = jnp.asarray(
      rng.normal(0.0, 30.0, size=params['conv1_1']['kernel'].shape), jnp.float32)
  return x, params


def test_a_lrn_is_net_a_with_alexnet_lrn_after_conv1_1():
  """Table 1: A-LRN = A + LRN after conv1_1's ReLU; same params, TF's LRN spliced into A = A-LRN."""
  x, params = a_lrn_inputs()
  model_a = models.VGG(variant='A', width=0.125, num_classes=10)
  model_lrn = models.VGG(variant='A-LRN', width=0.125, num_classes=10)
  assert param_shapes(model_lrn, 32) == param_shapes(model_a, 32)

  def conv1_1_then_tf_lrn(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name == 'conv1_1' and context.method_name == '__call__':
      # A applies its own ReLU next, which leaves LRN's non-negative output unchanged.
      return jnp.asarray(tf_lrn(jax.nn.relu(out)))
    return out

  with nn.intercept_methods(conv1_1_then_tf_lrn):
    expected = model_a.apply({'params': params}, x)
  plain_a = model_a.apply({'params': params}, x)
  actual = model_lrn.apply({'params': params}, x)
  assert relative_error(actual, plain_a) > 1e-2  # LRN is on the path and matters here.
  assert relative_error(actual, expected) <= 1e-5


# 4. Keras.

def keras_vgg_with_random_weights(application, size, classes, rng):
  """A Keras VGG16/19 with He-normal kernels and N(0, 0.1) biases (Keras zero-inits biases)."""
  import keras  # pylint: disable=g-import-not-at-top
  net = getattr(keras.applications, application)(
      weights=None, include_top=True, input_shape=(size, size, 3), classes=classes,
      classifier_activation=None)
  params = {}
  for layer in net.layers:
    if not layer.weights:
      continue
    kernel_shape, bias_shape = (tuple(w.shape) for w in layer.weights)
    fan_in = int(np.prod(kernel_shape[:-1]))
    kernel = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=kernel_shape).astype(np.float32)
    bias = rng.normal(0.0, 0.1, size=bias_shape).astype(np.float32)
    layer.set_weights([kernel, bias])
    if layer.name.startswith('block'):  # block3_conv2 -> conv3_2
      block, conv = layer.name[len('block'):].split('_conv')
      name = f'conv{block}_{conv}'
    else:
      name = {'fc1': 'fc6', 'fc2': 'fc7', 'predictions': 'fc8'}[layer.name]
    # Keras Conv2D kernels are HWIO and Dense kernels (in, out), as in Flax.
    params[name] = {'kernel': jnp.asarray(kernel), 'bias': jnp.asarray(bias)}
  return net, params


@pytest.mark.parametrize('variant,application', [('D', 'VGG16'), ('E', 'VGG19')])
def test_forward_matches_keras_vgg16_and_vgg19(variant, application):
  """Nets D and E are Keras' VGG16 / VGG19; at 64x64 fc6 sees 2x2x512, which pins flatten order."""
  rng = fresh_rng()
  size, classes = 64, 10
  keras_net, params = keras_vgg_with_random_weights(application, size, classes, rng)
  x = rng.uniform(-1.0, 1.0, size=(2, size, size, 3)).astype(np.float32)
  expected = np.asarray(keras_net(x, training=False))

  model = models.VGG(variant=variant, num_classes=classes)
  assert set(params) == set(models.layer_names(variant))
  actual = model.apply({'params': params}, jnp.asarray(x), train=False)
  assert actual.shape == expected.shape == (2, classes)
  assert actual.dtype == jnp.float32
  assert relative_error(actual, expected) <= 1e-5


# 5. bfloat16.

def test_bfloat16_computes_in_bf16_keeps_float32_params_and_logits():
  """Mixed precision: bf16 activations, float32 params and logits, close to the float32 net."""
  x = jnp.asarray(fresh_rng().uniform(-1.0, 1.0, size=(8, 32, 32, 3)), jnp.float32)
  kwargs = dict(variant='D', width=0.125, num_classes=10)
  bf16 = models.VGG(dtype=jnp.bfloat16, **kwargs)
  initialised = jax.eval_shape(bf16.init, jax.random.key(0), x)['params']
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(initialised))
  params = random_params(bf16)

  logits, state = bf16.apply({'params': params}, x, capture_intermediates=True)
  assert logits.dtype == jnp.float32
  layers = state['intermediates']
  assert all(layers[name]['__call__'][0].dtype == jnp.bfloat16
             for name in models.layer_names('D'))
  expected = models.VGG(dtype=jnp.float32, **kwargs).apply({'params': params}, x)
  assert expected.dtype == jnp.float32
  error = relative_error(logits, expected)
  assert 0.0 < error <= 5e-2  # Not bit-identical (it did run in bf16), yet close.


# 6. Input sizes and errors.

@pytest.mark.parametrize('height,width', [(32, 32), (64, 64), (96, 96), (32, 96)])
def test_any_multiple_of_32_works_with_fc6_sized_to_the_grid(height, width):
  """Five 2x2/2 max-pools (Sec. 2.1) leave a (H/32)x(W/32) grid of conv5 channels for fc6."""
  model = models.VGG(variant='B', width=0.125, num_classes=7)
  conv5_channels, fc_width = 512 // 8, 4096 // 8
  shapes = param_shapes(model, height, width)
  assert shapes['fc6']['kernel'] == ((height // 32) * (width // 32) * conv5_channels, fc_width)
  x = jnp.asarray(fresh_rng().uniform(-1.0, 1.0, size=(3, height, width, 3)), jnp.float32)
  logits = model.apply({'params': random_params(model, height, width)}, x)
  assert logits.shape == (3, 7)
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize('height,width', [(48, 48), (32, 48), (224 + 16, 224)])
def test_size_not_a_multiple_of_32_raises(height, width):
  """A size that five 2x2/2 pools cannot divide exactly would silently drop border pixels."""
  model = models.VGG(variant='A', width=0.125)
  with pytest.raises(ValueError, match='32'):
    model.init(jax.random.key(0), jnp.zeros((1, height, width, 3)))


def test_unknown_variant_raises_naming_the_valid_ones():
  """Only Table 1's configurations exist; the error lists them."""
  with pytest.raises(ValueError) as info:
    models.VGG(variant='F', width=0.125).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  for valid in ('A', 'A-LRN', 'B', 'C', 'D', 'E'):
    assert valid in str(info.value)
  assert 'F' in str(info.value)


# 7. Initialisation.

def sample_std_tolerance(n: int) -> float:
  """Six standard errors of a normal sample's std (sqrt(1 / (2n)) relative), floored at 1%."""
  return max(0.01, 6.0 / np.sqrt(2.0 * n))


@pytest.mark.parametrize('width,std', [(0.5, 0.01), (0.125, 0.1)])
def test_paper_init_is_zero_mean_normal_with_given_std_and_zero_biases(width, std):
  """Sec. 3.1: weights from a zero-mean normal (std 0.01 as in the authors' Caffe), biases 0."""
  model = models.VGG(variant='C', width=width, num_classes=10, init_scheme='paper', init_std=std)
  params = fast_init(model)
  for name, layer in params.items():
    kernel = np.asarray(layer['kernel'], np.float64)
    n = kernel.size
    assert abs(kernel.std() / std - 1.0) <= sample_std_tolerance(n), name
    assert abs(kernel.mean()) <= 6.0 * std / np.sqrt(n), name
    assert np.all(np.asarray(layer['bias']) == 0.0), name
  # Normal, not uniform: kurtosis 3 (a uniform's is 1.8), checked on the largest kernel.
  fc7 = np.asarray(params['fc7']['kernel'], np.float64).ravel()
  assert abs(np.mean(fc7 ** 4) / np.mean(fc7 ** 2) ** 2 - 3.0) < 0.1


# Hand-counted fan-ins of net C at width 1/8 on a 32 x 32 crop, and of the paper's net (width 1,
# 224 crop): (here, full size). fc6 sees 1 x 1 x 64 here, 7 x 7 x 512 there.
FAN_INS_C = {'conv1_1': (27, 27), 'conv1_2': (72, 576), 'conv2_1': (72, 576),
             'conv3_1': (144, 1152), 'conv3_3': (32, 256), 'conv4_1': (288, 2304),
             'conv5_3': (64, 512), 'fc6': (64, 25088), 'fc7': (512, 4096), 'fc8': (512, 4096)}


def test_paper_init_as_full_size_gives_each_layer_the_full_size_nets_gain():
  """A layer's variance gain is fan_in * std^2 / 2: matching the paper's net needs std scaled by
  sqrt(full-size fan-in / fan-in) (conv1_1 unchanged, fc6 by sqrt(392))."""
  model = models.VGG(variant='C', width=0.125, num_classes=10, init_scheme='paper',
                     init_std=0.01, init_std_as_full_size=True)
  params = fast_init(model)
  for name, (fan_in, full) in FAN_INS_C.items():
    kernel = np.asarray(params[name]['kernel'], np.float64)
    assert int(np.prod(kernel.shape[:-1])) == fan_in, name
    expected = 0.01 * np.sqrt(full / fan_in)
    assert abs(kernel.std() / expected - 1.0) <= sample_std_tolerance(kernel.size), name


def test_glorot_init_has_variance_two_over_fan_in_plus_fan_out():
  """Sec. 3.1's closing remark: Glorot & Bengio (2010), Var = 2 / (fan_in + fan_out), uniform."""
  model = models.VGG(variant='C', width=0.25, num_classes=10, init_scheme='glorot')
  params = fast_init(model)
  for name, layer in params.items():
    kernel = np.asarray(layer['kernel'], np.float64)
    receptive_field = int(np.prod(kernel.shape[:-2]))  # kh * kw for convs, 1 for dense layers
    fan_in = receptive_field * kernel.shape[-2]
    fan_out = receptive_field * kernel.shape[-1]
    variance = 2.0 / (fan_in + fan_out)
    # A uniform sample's variance has a relative standard error of sqrt(0.8 / n).
    tolerance = max(0.02, 6 * np.sqrt(0.8 / kernel.size))
    assert abs(np.mean(kernel ** 2) / variance - 1.0) <= tolerance, name
    assert np.max(np.abs(kernel)) <= np.sqrt(3.0 * variance) + 1e-7, name  # uniform's bound
    assert np.all(np.asarray(layer['bias']) == 0.0), name


def test_unknown_init_scheme_raises():
  """A typo in `config.init` must not silently fall back to some other initialisation."""
  with pytest.raises(ValueError, match='he'):
    models.VGG(variant='A', width=0.125, init_scheme='he').init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError):
    models.kernel_init('xavier_normal')


# 8. Dropout.

def small_net_and_batch(dropout_rate=0.5):
  model = models.VGG(variant='A', width=0.125, num_classes=10, dropout_rate=dropout_rate)
  x = jnp.asarray(fresh_rng().uniform(-1.0, 1.0, size=(4, 32, 32, 3)), jnp.float32)
  return model, {'params': random_params(model)}, x


def test_eval_is_deterministic_and_needs_no_rng():
  """Dropout is a training-time regulariser only (Sec. 3.1); evaluation is a fixed function."""
  model, variables, x = small_net_and_batch()
  first = model.apply(variables, x, train=False)
  again = model.apply(variables, x, train=False)
  with_rng = model.apply(variables, x, train=False, rngs={'dropout': fresh_key()})
  np.testing.assert_array_equal(first, again)
  np.testing.assert_array_equal(first, with_rng)


def test_training_dropout_needs_a_key_and_is_random():
  """Training dropout draws a fresh mask per key: none without one, the same for the same key."""
  model, variables, x = small_net_and_batch()
  with pytest.raises(flax.errors.InvalidRngError):
    model.apply(variables, x, train=True)
  key = fresh_key()
  a = model.apply(variables, x, train=True, rngs={'dropout': key})
  b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.fold_in(key, 1)})
  same_key = model.apply(variables, x, train=True, rngs={'dropout': key})
  assert relative_error(a, b) > 1e-3
  np.testing.assert_array_equal(a, same_key)


def test_zero_dropout_rate_makes_training_equal_eval():
  """train=True only switches dropout on; at rate 0 nothing else may change."""
  model, variables, x = small_net_and_batch(dropout_rate=0.0)
  train = model.apply(variables, x, train=True, rngs={'dropout': fresh_key()})
  evaluation = model.apply(variables, x, train=False)
  np.testing.assert_allclose(train, evaluation, rtol=1e-6, atol=1e-7)


def test_dropout_drops_the_given_fraction_of_fc6_and_fc7_units():
  """Sec. 3.1: dropout on the first two FC layers; a unit is dropped with prob. `dropout_rate`."""
  rate = 0.3
  model, variables, x = small_net_and_batch(dropout_rate=rate)
  seen = []

  def record_dropout(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Dropout):
      seen.append((np.asarray(args[0]), np.asarray(out)))
    return out

  with nn.intercept_methods(record_dropout):
    model.apply(variables, x, train=True, rngs={'dropout': fresh_key()})
  assert len(seen) == 2  # after fc6 and after fc7, not after fc8
  for inputs, outputs in seen:
    assert inputs.shape == (4, 4096 // 8)
    active = inputs != 0
    kept = outputs[active] != 0
    # Kept units are rescaled by 1 / (1 - rate) (inverted dropout); dropped ones are 0.
    np.testing.assert_allclose(outputs[active][kept], inputs[active][kept] / (1 - rate),
                               rtol=1e-6)
    n = int(active.sum())
    assert n > 200
    assert abs(kept.mean() - (1 - rate)) < 6 * np.sqrt(rate * (1 - rate) / n)


# 9. Width.

@pytest.mark.parametrize('width,conv1,conv5,fc', [(0.25, 16, 128, 1024), (0.125, 8, 64, 512)])
def test_width_multiplies_every_channel_count(width, conv1, conv5, fc):
  """`width` thins all layers uniformly (fc6/fc7 included); fc8 keeps num_classes."""
  shapes = param_shapes(models.VGG(variant='D', width=width, num_classes=10), 32)
  assert shapes['conv1_1']['kernel'] == (3, 3, 3, conv1)
  assert shapes['conv3_3']['kernel'] == (3, 3, 4 * conv1, 4 * conv1)
  assert shapes['conv5_3']['kernel'] == (3, 3, conv5, conv5)
  assert shapes['fc6']['kernel'] == (conv5, fc)
  assert shapes['fc7']['kernel'] == (fc, fc)
  assert shapes['fc8']['kernel'] == (fc, 10)


# ---------------------------------------------------------------------------------------------
# The two gradients computed vgg_jax's own way (for CPU speed, benchmarks/conv_grads.py).


def numpy_kernel_grad(x, grad, kernel_size):
  """d(sum(conv(x, k) * grad)) / dk of a stride-1 'SAME' convolution, straight from its sum."""
  pad = kernel_size // 2
  padded = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  height, width = x.shape[1:3]
  return np.stack([
      np.stack([np.einsum('nhwc,nhwf->cf', padded[:, i:i + height, j:j + width],
                          np.asarray(grad, np.float64)) for j in range(kernel_size)])
      for i in range(kernel_size)])


@pytest.mark.parametrize('kernel_size', [1, 3])
def test_matmul_kernel_gradient_equals_the_convolutions_gradient(kernel_size):
  rng = fresh_rng()
  x = jnp.asarray(rng.normal(size=(3, 12, 10, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 5, 7)), jnp.float32)
  grad = jnp.asarray(rng.normal(size=(3, 12, 10, 7)), jnp.float32)
  value, vjp = jax.vjp(ops.conv_matmul_weight_grad, x, kernel)
  grad_x, grad_kernel = vjp(grad)
  xla_value, xla_vjp = jax.vjp(ops.conv, x, kernel)  # pylint: disable=protected-access
  xla_grad_x, _ = xla_vjp(grad)
  assert relative_error(grad_kernel, numpy_kernel_grad(x, grad, kernel_size)) < 1e-5
  np.testing.assert_array_equal(value, xla_value)
  np.testing.assert_array_equal(grad_x, xla_grad_x)


def test_max_pool_2x2_has_max_pools_values_and_gradients_bitwise_ties_included():
  rng = fresh_rng()
  x = jnp.asarray(rng.normal(size=(2, 8, 6, 4)), jnp.float32)
  x = jnp.maximum(x, 0.0).at[:, :2].set(1.5)  # Zeros and whole windows of equal values.
  grad = jnp.asarray(rng.normal(size=(2, 4, 3, 4)), jnp.float32)
  reference = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
  value, vjp = jax.vjp(ops.max_pool_2x2, x)
  expected_value, expected_vjp = jax.vjp(reference, x)
  np.testing.assert_array_equal(value, expected_value)
  np.testing.assert_array_equal(vjp(grad)[0], expected_vjp(grad)[0])
  # Each window's gradient lands on exactly one input: its first maximum.
  assert int(jnp.sum(vjp(jnp.ones_like(grad))[0] != 0)) == grad.size
  odd = jnp.asarray(rng.normal(size=(1, 5, 7, 2)), jnp.float32)
  np.testing.assert_array_equal(ops.max_pool_2x2(odd), reference(odd))


# What a researcher takes of a loss or a layer f(*primals): vgg_jax's own primitives (here and in
# tests/test_winograd.py) give each what XLA's give.
def scalar(f):
  """A scalar loss of f's output, nonlinear in it so that second derivatives are not zero."""
  return lambda *args: jnp.sum(jnp.sin(f(*args)))


def squared_norm(tree) -> jax.Array:
  return sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(tree))


TRANSFORMATIONS = {
    'jvp': lambda f, primals, tangents: jax.jvp(f, primals, tangents),
    'linearize': lambda f, primals, tangents: jax.linearize(f, *primals)[1](*tangents),
    'hessian_vector_product': lambda f, primals, tangents: jax.jvp(
        jax.grad(scalar(f), range(len(primals))), primals, tangents)[1],
    'grad_of_grad_norm': lambda f, primals, tangents: jax.grad(
        lambda *p: squared_norm(jax.grad(scalar(f), range(len(p)))(*p)),
        range(len(primals)))(*primals),
    'vmap': lambda f, primals, tangents: jax.vmap(f)(*jax.tree.map(
        lambda p, t: jnp.stack([p, p + 0.1 * t]), primals, tangents)),
    'vmap_of_grad': lambda f, primals, tangents: jax.vmap(  # Per-example gradients.
        jax.grad(lambda x, *rest: scalar(f)(x[None], *rest), range(len(primals))),
        (0,) + (None,) * (len(primals) - 1))(*primals),
}



@pytest.mark.parametrize('transformation', TRANSFORMATIONS)
def test_every_transformation_of_the_max_pool_is_max_pools_bitwise_ties_included(transformation):
  rng = fresh_rng()
  x = jnp.asarray(rng.normal(size=(2, 8, 6, 4)), jnp.float32)
  x = jnp.maximum(x, 0.0).at[:, :2].set(1.5)  # Zeros and whole windows of equal values.
  tangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  reference = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
  transform = TRANSFORMATIONS[transformation]
  got = jax.jit(lambda x, t: transform(ops.max_pool_2x2, (x,), (t,)))(x, tangent)
  expected = jax.jit(lambda x, t: transform(reference, (x,), (t,)))(x, tangent)
  for leaf, expected_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(leaf, expected_leaf)


@pytest.mark.parametrize('transformation', TRANSFORMATIONS)
def test_every_transformation_of_the_matmul_kernel_gradient_convolution_is_xlas(transformation):
  rng = fresh_rng()
  primals = (jnp.asarray(rng.normal(size=(3, 12, 10, 5)), jnp.float32),
             jnp.asarray(rng.normal(size=(3, 3, 5, 7)), jnp.float32))
  tangents = tuple(jnp.asarray(rng.normal(size=p.shape), jnp.float32) for p in primals)
  transform = TRANSFORMATIONS[transformation]
  got = jax.jit(lambda *a: transform(ops.conv_matmul_weight_grad, a[:2], a[2:]))(*primals,
                                                                                 *tangents)
  expected = jax.jit(lambda *a: transform(ops.conv, a[:2], a[2:]))(*primals, *tangents)
  for leaf, expected_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert relative_error(leaf, expected_leaf) < 1e-5


def test_every_weight_grad_choice_gives_the_same_network_gradients():
  rng = fresh_rng()
  x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 2))

  def grads(weight_grad, params):
    model = models.VGG(variant='C', width=1 / 16, num_classes=10, weight_grad=weight_grad)
    loss = lambda p: jnp.mean(
        -jax.nn.log_softmax(model.apply({'params': p}, x))[jnp.arange(2), labels])
    return jax.grad(loss)(params)

  params = random_params(models.VGG(variant='C', width=1 / 16, num_classes=10), rng=rng)
  expected = grads('conv', params)
  for weight_grad in ('matmul', 'auto'):
    actual = grads(weight_grad, params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(actual):
      reference = dict(jax.tree_util.tree_leaves_with_path(expected))[path]
      assert relative_error(leaf, reference) < 1e-5, (weight_grad, path)


def test_unknown_weight_grad_raises_naming_the_choices():
  with pytest.raises(ValueError, match="weight_grad='fast'.*auto, conv, matmul"):
    models.VGG(variant='A', width=0.125, weight_grad='fast').init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
