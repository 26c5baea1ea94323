"""`vgg_jax.winograd` against XLA's own convolution, and how `models` chooses it.

The reference is `lax.conv_general_dilated` with `jax.nn.relu`, differentiated by JAX: nothing
of the Winograd transforms. F(4x4, 3x3) in float32 differs from it by rounding, measured at
1e-6 to 2e-5 of the largest value, so `winograd.TOLERANCE` (1e-4) fails a wrong coefficient.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import digits
from vgg_jax import config_validation
from vgg_jax import errors
from vgg_jax import models
from vgg_jax import ops
from vgg_jax import preprocess
from vgg_jax import winograd

pytestmark = pytest.mark.skipif(not winograd.available(),
                                reason=f'no Winograd kernels: {winograd.unavailable_reason()}')


def fresh_rng() -> np.random.Generator:
  return np.random.default_rng(int.from_bytes(os.urandom(4), 'little'))


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# (N, H, W, C, K): borders on every side of a tile (H, W not multiples of 4), a lone partial
# tile (2 x 2, conv5 of the digits nets), channel counts off the 8-wide vectors, and one layer
# of the paper's net (conv4_2 at 224 is 28 x 28 x 512; narrower here to stay fast).
SHAPES = [(2, 13, 10, 5, 9), (3, 2, 2, 16, 8), (1, 7, 7, 19, 24), (2, 28, 28, 64, 128)]


@pytest.mark.parametrize('relu', [True, False], ids=['relu', 'linear'])
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_winograd_value_and_gradients_equal_xla_convolution(shape, relu):
  n, height, width, channels, features = shape
  rng = fresh_rng()
  x = jnp.asarray(rng.normal(size=(n, height, width, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, channels, features)) / np.sqrt(9 * channels),
                       jnp.float32)
  bias = jnp.asarray(rng.normal(0, 0.5, features), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(n, height, width, features)), jnp.float32)
  activation = jax.nn.relu if relu else (lambda z: z)
  if relu:
    # Where a pre-activation is within rounding of zero, the two float32 computations may put
    # it on either side of the ReLU, and then the gradient through it is all or nothing: no
    # gradient flows back from those few outputs, in either computation.
    z = ops.conv(x, kernel) + bias
    dy = jnp.where(jnp.abs(z) < 1e-4 * jnp.abs(z).max(), 0.0, dy)

  def reference(x, kernel, bias):
    return activation(ops.conv(x, kernel) + bias)

  results = []
  for f in (lambda x, k, b: winograd.conv_bias_relu(x, k, b, relu), reference):
    y, vjp = jax.jit(lambda *args, f=f: jax.vjp(f, *args))(x, kernel, bias)
    results.append((y, *vjp(dy)))
  for part, got, expected in zip(('y', 'dx', 'dkernel', 'dbias'), *results):
    assert got.shape == expected.shape, part
    assert relative_error(got, expected) < winograd.TOLERANCE, part


def test_relu_keeps_nan_as_xla_does():
  x = jnp.full((1, 4, 4, 16), jnp.nan, jnp.float32)
  y = winograd.conv_bias_relu(x, jnp.ones((3, 3, 16, 8)), jnp.zeros(8), True)
  assert bool(jnp.isnan(y).all())


def vgg_loss_and_grads(conv_algorithm, params, x, labels):
  model = models.VGG(variant='B', width=1 / 8, num_classes=10, conv_algorithm=conv_algorithm)

  def loss(p):
    logits = model.apply({'params': p}, x)
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels]), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def test_vgg_on_winograd_gives_xla_logits_and_gradients_layer_by_layer():
  # A fixed draw: two float32 computations can put a pre-activation at zero or a max-pool
  # near-tie on either side, and then a whole gradient term moves (2 of 12 random draws moved
  # fc7's bias gradient 8e-2 or conv1_1's kernel gradient 1e-2). Seed 0: all within 5e-6.
  rng = np.random.default_rng(0)
  model = models.VGG(variant='B', width=1 / 8, num_classes=10)
  x = jnp.asarray(rng.normal(0, 50, (16, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 16))
  params = model.init(jax.random.key(int(rng.integers(1 << 30))), x[:1])['params']
  (_, expected_logits), expected = vgg_loss_and_grads('xla', params, x, labels)
  (_, logits), grads = vgg_loss_and_grads('winograd', params, x, labels)
  assert relative_error(logits, expected_logits) < winograd.TOLERANCE
  for layer in models.layer_names('B'):
    for kind in ('kernel', 'bias'):
      assert relative_error(grads[layer][kind], expected[layer][kind]) < winograd.TOLERANCE, (
          layer, kind)


@pytest.mark.parametrize('tiles, channels, features', [(7, 5, 9), (49, 24, 40), (100, 19, 33)])
def test_products_of_packed_kernels_are_the_36_matmuls(tiles, channels, features):
  # Row blocks of 6 with every remainder, 16-column panels with and without a partial one.
  rng = fresh_rng()
  v = rng.normal(size=(36, tiles, channels)).astype(np.float32)
  u = rng.normal(size=(36, channels, features)).astype(np.float32)
  packed = np.zeros((36, -(-features // 16), channels, 16), np.float32)
  for k in range(features):
    packed[:, k // 16, :, k % 16] = u[:, :, k]
  expected = np.einsum('epc,eck->epk', v.astype(np.float64), u.astype(np.float64))
  got = jax.jit(winograd.products, static_argnums=2)(v, packed, features)
  assert relative_error(got, expected) < 1e-6
  assert relative_error(winograd._packed(jnp.asarray(u)), packed) == 0


def test_transformed_kernels_give_xla_logits_take_winograd_on_few_tiles_and_not_in_gradients():
  # Width 1/4, 64 x 64, batch 8: conv4 (128 -> 128 channels) has 32 tiles, XLA's convolution
  # without transformed kernels and Winograd's with them.
  rng = np.random.default_rng(1)
  model = models.VGG(variant='D', width=1 / 4, num_classes=10)
  x = jnp.asarray(rng.normal(0, 50, (8, 64, 64, 3)), jnp.float32)
  params = model.init(jax.random.key(1), x[:1])['params']
  transformed = winograd.transformed_kernels(params, 'auto', jnp.float32)
  assert sorted(transformed) == sorted(set(models.layer_names('D')[1:-3]))  # Not conv1_1.
  assert transformed['conv4_1']['kernel'].shape == (36, 128 // 16, 64, 16)  # Packed U.
  expected = models.VGG(variant='D', width=1 / 4, num_classes=10, conv_algorithm='xla').apply(
      {'params': params}, x)
  apply = jax.jit(lambda variables: model.apply(variables, x))
  logits = apply({'params': params, models.WINOGRAD: transformed})
  assert relative_error(logits, expected) < winograd.TOLERANCE

  wrong = jax.tree.map(lambda u: u, transformed)
  wrong['conv4_2']['kernel'] = jnp.zeros_like(wrong['conv4_2']['kernel'])
  assert relative_error(apply({'params': params, models.WINOGRAD: wrong}), expected) > 0.1

  def grads(variables):
    loss = lambda p: jnp.sum(model.apply({**variables, 'params': p}, x) ** 2)
    return jax.jit(jax.grad(loss))(params)

  # Differentiated, conv4 takes Winograd (U given) but makes U from its kernel.
  right, with_wrong = grads({models.WINOGRAD: transformed}), grads({models.WINOGRAD: wrong})
  for layer in models.layer_names('D'):
    np.testing.assert_array_equal(with_wrong[layer]['kernel'], right[layer]['kernel'])


def test_notebook_functions_make_the_winograd_kernels_once_per_jax_parameters(monkeypatch):
  from vgg_jax import inference  # pylint: disable=g-import-not-at-top
  calls = []
  make = winograd.transformed_kernels
  monkeypatch.setattr(winograd, 'transformed_kernels', lambda *a: calls.append(1) or make(*a))
  rng = np.random.default_rng(2)
  model = models.VGG(variant='A', width=1 / 4, num_classes=10)
  x = jnp.asarray(rng.normal(0, 50, (8, 64, 64, 3)), jnp.float32)
  params = model.init(jax.random.key(2), x[:1])['params']
  expected = models.VGG(variant='A', width=1 / 4, num_classes=10, conv_algorithm='xla').apply(
      {'params': params}, x)
  for _ in range(2):
    fc8 = inference.features(model, {'params': params}, x, layers=('fc8',))['fc8']
    assert relative_error(fc8, expected) < winograd.TOLERANCE
  assert len(calls) == 1
  image = rng.integers(0, 256, (64, 64, 3), np.uint8)
  at_q = inference.Preprocess(preprocess.Normalization(), 64, 64)
  inference.predict(model, {'params': params}, image, at_q)
  assert len(calls) == 1
  changed = jax.tree.map(lambda p: p * 1.5, params)  # New arrays: their own kernels.
  inference.features(model, {'params': changed}, x, layers=('fc8',))
  assert len(calls) == 2
  as_numpy = jax.tree.map(np.asarray, params)  # Mutable in place: none kept.
  fc8 = inference.features(model, {'params': as_numpy}, x, layers=('fc8',))['fc8']
  assert len(calls) == 2 and relative_error(fc8, expected) < winograd.TOLERANCE


def test_auto_takes_winograd_only_where_it_was_measured_faster_on_the_cpu():
  def uses(x_shape, features, kernel_size=3, dtype=jnp.float32, backend='cpu'):
    kernel_shape = (kernel_size, kernel_size, x_shape[-1], features)
    return winograd.uses_winograd('auto', x_shape, kernel_shape, dtype, backend)

  assert uses((8, 56, 56, 256), 256)  # conv3_2 of the paper's net, batch 8: 1,568 tiles.
  assert uses((8, 14, 14, 512), 512)  # conv5 at batch 8: 128 tiles.
  assert not uses((8, 224, 224, 3), 64)  # conv1_1: a contraction over 3 channels.
  assert not uses((1, 28, 28, 512), 512)  # conv4 at batch 1: 49 tiles of a 38 MB U.
  assert not uses((1, 14, 14, 512), 512)  # conv5 at batch 1: 16 tiles.
  # With U made beforehand (fixed weights), 16 tiles are enough: conv5 at batch 1 has 16.
  assert winograd.uses_winograd('auto', (1, 14, 14, 512), (3, 3, 512, 512), jnp.float32, 'cpu',
                                transformed=True)
  assert not winograd.uses_winograd('auto', (1, 12, 12, 512), (3, 3, 512, 512), jnp.float32,
                                    'cpu', transformed=True)
  assert uses((64, 4, 4, 64), 64)  # conv4 of the digits net: 64 tiles, a 590 KB U.
  assert not uses((2, 8, 8, 64), 64)  # 8 tiles.
  assert not uses((8, 28, 28, 512), 512, kernel_size=1)  # C's 1x1 layers.
  assert not uses((8, 56, 56, 256), 256, dtype=jnp.bfloat16)
  assert not uses((8, 56, 56, 256), 256, backend='gpu')
  assert not winograd.uses_winograd('xla', (8, 56, 56, 256), (3, 3, 256, 256), jnp.float32,
                                    'cpu')
  assert winograd.uses_winograd('winograd', (1, 14, 14, 3), (3, 3, 3, 8), jnp.float32, 'cpu')
  with pytest.raises(ValueError, match="conv_algorithm='fast'.*auto, xla, winograd"):
    winograd.uses_winograd('fast', (8, 56, 56, 256), (3, 3, 256, 256), jnp.float32, 'cpu')


@pytest.mark.parametrize('dtype, why', [('bfloat16', 'runs float32 on the CPU, not bfloat16')])
def test_winograd_in_another_dtype_is_a_one_line_config_error(dtype, why):
  config = digits.get_config()
  config.conv_algorithm, config.dtype = 'winograd', dtype
  with pytest.raises(errors.ConfigError, match=f'config.conv_algorithm=winograd {why}') as e:
    config_validation.validate(config, num_devices=1)
  assert '\n' not in str(e.value) and 'use conv_algorithm=auto or xla' in str(e.value)


def test_unknown_conv_algorithm_is_a_config_error_naming_the_choices():
  config = digits.get_config()
  config.conv_algorithm = 'fft'
  with pytest.raises(errors.ConfigError,
                     match="config.conv_algorithm='fft': expected one of auto, xla, winograd"):
    config_validation.validate(config, num_devices=1)


def test_without_a_compiler_auto_warns_once_and_keeps_xla_and_winograd_says_why(
    monkeypatch, caplog):
  monkeypatch.setattr(winograd, 'compiler', lambda: None)
  reason = winograd._load.__wrapped__()  # The loader itself, past its cache.
  assert reason == 'no C++ compiler (g++, c++ or clang++, or $CXX) on the PATH'
  monkeypatch.setattr(winograd, 'unavailable_reason', lambda: reason)
  winograd._warn_unavailable.cache_clear()
  with caplog.at_level('WARNING', logger='absl'):
    for _ in range(3):
      assert not winograd.uses_winograd('auto', (8, 56, 56, 256), (3, 3, 256, 256),
                                        jnp.float32, 'cpu')
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert warnings == [f"conv_algorithm=auto: XLA's convolutions, not Winograd's ({reason})."]
  with pytest.raises(RuntimeError, match='conv_algorithm=winograd: no C\\+\\+ compiler'):
    winograd.uses_winograd('winograd', (8, 56, 56, 256), (3, 3, 256, 256), jnp.float32,
                           'cpu')
  winograd._warn_unavailable.cache_clear()


def test_a_source_that_does_not_compile_is_reported_in_one_line(monkeypatch, tmp_path):
  broken = tmp_path / 'winograd.cc'
  broken.write_text('this is not C++;\n')
  monkeypatch.setattr(winograd, 'SOURCE', str(broken))
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  reason = winograd._load.__wrapped__()
  assert reason.startswith(f'{broken} was not built: ') and 'could not compile it' in reason
  assert 'error' in reason and '\n' not in reason
  assert not list((tmp_path / 'cache' / 'vgg_jax').glob('*.so'))
