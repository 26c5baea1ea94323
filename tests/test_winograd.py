"""`vgg_jax.winograd` against XLA's own convolution and exact arithmetic, and how `models`
chooses it.

The reference for the convolution is `lax.conv_general_dilated` with `jax.nn.relu`, transformed
by JAX (jvp, grad, vmap, ...): nothing of the Winograd transforms. F(4x4, 3x3) in float32
differs from it by rounding, measured at 1e-6 to 2e-5 of the largest value
(`winograd.TOLERANCE`, 1e-4). Each C++ transform is also checked, on basis inputs, against
Lavin & Gray's matrices in float64: every output is a product of two coefficients there, so a
coefficient 0.02% off moves one by 2e-4, 200x the float32 rounding allowed, wherever it is.
"""

import ctypes
import os
import shutil
import stat
import subprocess
import sys
import tempfile

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
from tests.test_models import TRANSFORMATIONS, random_params

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
  at_q = inference.InputTransform(preprocess.Normalization(), 64, 64)
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


# ---------------------------------------------------------------------------------------------
# Every transformation JAX offers, against XLA's convolution.

def assert_trees_close(got, expected, tolerance=winograd.TOLERANCE):
  for (path, leaf), expected_leaf in zip(jax.tree_util.tree_leaves_with_path(got),
                                         jax.tree.leaves(expected)):
    assert leaf.shape == expected_leaf.shape, path
    error = relative_error(leaf, expected_leaf)
    assert error < tolerance, (path, error)


@pytest.mark.parametrize('relu', [True, False], ids=['relu', 'linear'])
@pytest.mark.parametrize('transformation', TRANSFORMATIONS)
def test_every_transformation_of_the_winograd_convolution_is_xlas(transformation, relu):
  # Fixed draws, whose pre-activations are all at least 1e-4 of the largest away from zero:
  # closer, the two float32 computations may put one on either side of the ReLU, and a
  # derivative through it is all or nothing there.
  rng = np.random.default_rng(3)
  n, height, width, channels, features = 2, 9, 7, 16, 12
  x = jnp.asarray(rng.normal(size=(n, height, width, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, channels, features)) / np.sqrt(9 * channels),
                       jnp.float32)
  bias = jnp.asarray(rng.normal(0, 0.5, features), jnp.float32)
  tangents = tuple(jnp.asarray(rng.normal(size=p.shape), jnp.float32) for p in (x, kernel, bias))
  z = np.asarray(ops.conv(x, kernel) + bias)
  assert np.abs(z).min() > 1e-4 * np.abs(z).max()
  activation = jax.nn.relu if relu else (lambda z: z)

  def reference(x, kernel, bias):
    return activation(ops.conv(x, kernel) + bias)

  def ours(x, kernel, bias):
    return winograd.conv_bias_relu(x, kernel, bias, relu)

  transform = TRANSFORMATIONS[transformation]
  got = jax.jit(lambda *a: transform(ours, a[:3], a[3:]))(x, kernel, bias, *tangents)
  expected = jax.jit(lambda *a: transform(reference, a[:3], a[3:]))(x, kernel, bias, *tangents)
  assert_trees_close(got, expected)


@pytest.mark.parametrize('transformation', [t for t in TRANSFORMATIONS if t != 'vmap_of_grad'])
def test_every_transformation_of_the_net_on_the_cpu_defaults_is_that_of_xlas_convolutions(
    transformation):
  # Net A at width 1/4 on 64 x 64 images: 'auto' takes Winograd for conv2 and conv3 (128
  # and 32 tiles), XLA's convolution for conv1 (3 channels) and conv4-5 (8 and 2 tiles).
  # He-normal kernels and N(0, 0.1) biases keep pre-activations and max-pool windows away from
  # the ties that float32 rounding may break either way.
  rng = np.random.default_rng(4)
  model = models.VGG(variant='A', width=1 / 4, num_classes=10, dropout_rate=0.0)
  reference = model.clone(conv_algorithm='xla', weight_grad='conv')
  params = random_params(model, height=64, rng=rng)
  x = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)
  tangents = (jnp.asarray(rng.normal(size=x.shape), jnp.float32),
              jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                           params))
  jaxpr = jax.make_jaxpr(lambda p: model.apply({'params': p}, x))(params)
  primitives = [eqn.primitive.name for eqn in jaxpr.eqns]
  assert primitives.count(f'{winograd.PREFIX}output') == 3  # conv2_1, conv3_1, conv3_2.

  transform = TRANSFORMATIONS[transformation]
  def run(net):
    f = lambda x, p: net.apply({'params': p}, x)
    return jax.jit(lambda *a: transform(f, a[:2], a[2:]))(x, params, *tangents)

  assert_trees_close(run(model), run(reference))


def test_gradients_under_shard_map_are_xlas():
  # shard_map checks how values vary over the devices: the Winograd and matmul-kernel-gradient
  # primitives say so, or the parameters' gradients would not be summed over them. Net C:
  # its 3x3 layers on Winograd, its 1x1 layers on `ops.conv_matmul_weight_grad`.
  mesh = jax.make_mesh((2,), ('batch',), devices=jax.devices()[:2])
  spec = jax.sharding.PartitionSpec
  rng = np.random.default_rng(5)
  model = models.VGG(variant='C', width=1 / 4, num_classes=10, conv_algorithm='winograd',
                     weight_grad='matmul')
  reference = model.clone(conv_algorithm='xla', weight_grad='conv')
  params = random_params(model, height=32, rng=rng)
  x = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec('batch')))

  def grads(net):
    loss = lambda p, x: jax.lax.pmean(jnp.mean(net.apply({'params': p}, x) ** 2), 'batch')
    return jax.jit(jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=(spec(), spec('batch')),
                                 out_specs=spec()))(params, x)

  assert_trees_close(grads(model), grads(reference))


# ---------------------------------------------------------------------------------------------
# Every coefficient of the C++ transforms, against exact arithmetic.

# Lavin & Gray's F(4x4, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A.
BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], np.float64)
# Each handler of winograd.cc, the matrix it applies (on both sides of a tile) and its `Site`
# there (the test build's VggJaxPerturb).
HANDLER_MATRICES = {'wino_input': (BT, 0), 'wino_input_t': (BT.T, 1), 'wino_kernel': (G, 2),
                    'wino_kernel_t': (G.T, 3), 'wino_output': (AT, 4),
                    'wino_output_t': (AT.T, 5)}
# float32 rounding of 1/6, 1/12 and 1/24 and of one product: ~1e-7 of an output.
EXACT_TOLERANCE = 1e-6


def test_the_reference_matrices_compute_a_correlation():
  rng = fresh_rng()
  d, g = rng.normal(size=6), rng.normal(size=3)
  np.testing.assert_allclose(AT @ ((G @ g) * (BT @ d)), np.correlate(d, g, 'valid'),
                             rtol=1e-12)
  assert sum(np.count_nonzero(m) for m in (BT, G, AT)) == 54


def _tiles_of(image, tile_grid):
  """(rows, cols) of (6, 6, C) windows at stride 4 of the image padded by 1: F(4x4, 3x3)'s
  input tiles."""
  padded = np.pad(image, ((1, 4 * tile_grid[0] + 1 - image.shape[0]),
                          (1, 4 * tile_grid[1] + 1 - image.shape[1]), (0, 0)))
  return np.stack([[padded[4 * ty:4 * ty + 6, 4 * tx:4 * tx + 6] for tx in range(tile_grid[1])]
                   for ty in range(tile_grid[0])])


def basis_cases():
  """handler -> (result shape, operands, attributes, exact result): one-hot inputs, one per
  channel (36 of them: 4 channels past the 8-wide vectors too), so that every output is
  one product of coefficients (or 0), on a 3 x 3 grid of tiles (borders and neighbours)."""
  cases = {}
  x = np.zeros((12, 12, 36))
  for c in range(36):
    x[3 + c // 6, 3 + c % 6, c] = 1  # The centre tile's 36 positions.
  v = np.einsum('ai,bj,yxijc->abyxc', BT, BT, _tiles_of(x, (3, 3))).reshape(36, 9, 36)
  cases['wino_input'] = ((36, 9, 36), [x[None]], {}, v)

  dv = np.zeros((36, 9, 36))
  dv[np.arange(36), 4, np.arange(36)] = 1  # The centre tile's 36 elements.
  padded = np.zeros((14, 14, 36))
  padded[4:10, 4:10] = np.einsum('ai,bj,abc->ijc', BT, BT, dv[:, 4].reshape(6, 6, 36))
  cases['wino_input_t'] = ((1, 12, 12, 36), [dv], {}, padded[None, 1:13, 1:13])

  g = np.zeros((3, 3, 2, 9))
  for k in range(9):
    g[k // 3, k % 3, :, k] = 1
  cases['wino_kernel'] = ((36, 2, 9), [g, g], {},
                          np.einsum('ia,jb,abck->ijck', G, G, g).reshape(36, 2, 9))

  du = np.eye(36).reshape(36, 4, 9)
  cases['wino_kernel_t'] = ((3, 3, 4, 9), [du], {},
                            np.einsum('ia,jb,ijck->abck', G, G, du.reshape(6, 6, 4, 9)))

  m = np.zeros((36, 4, 36))
  m[np.arange(36), :, np.arange(36)] = 1  # Every tile.
  tiles = np.einsum('qa,sb,abtk->tqsk', AT, AT, m.reshape(6, 6, 4, 36))
  y = tiles.reshape(2, 2, 4, 4, 36).transpose(0, 2, 1, 3, 4).reshape(1, 8, 8, 36)
  cases['wino_output'] = ((1, 8, 8, 36), [m, np.zeros(36)], {'mode': np.int32(1)}, y)

  dy = np.zeros((8, 8, 20))
  for k in range(20):
    q, s = divmod(k % 16, 4)
    dy[q::4, s::4, k] = 1  # Every tile.
  blocks = dy.reshape(2, 4, 2, 4, 20).transpose(0, 2, 1, 3, 4).reshape(4, 4, 4, 20)
  dm = np.einsum('qa,sb,tqsk->abtk', AT, AT, blocks).reshape(36, 4, 20)
  cases['wino_output_t'] = ((36, 4, 20), [dy[None], dy[None]], {'mode': np.int32(0)}, dm)
  return cases


def exactness(prefix: str) -> dict:
  """handler -> its largest error on the basis cases: relative to each exact output (absolute
  where it is 0)."""
  errors = {}
  for handler, (shape, operands, attributes, expected) in basis_cases().items():
    got = jax.ffi.ffi_call(f'{prefix}{handler}', jax.ShapeDtypeStruct(shape, jnp.float32))(
        *(jnp.asarray(o, jnp.float32) for o in operands), **attributes)
    error = np.abs(np.asarray(got, np.float64) - expected)
    errors[handler] = float(np.max(error / np.where(expected == 0, 1, np.abs(expected))))
  return errors


def test_every_transform_is_exact_up_to_float32_rounding():
  errors = exactness(winograd.PREFIX)
  assert max(errors.values()) < EXACT_TOLERANCE, errors


@pytest.fixture(scope='module')
def perturb():
  """VggJaxPerturb of winograd.cc built with -DVGG_JAX_PERTURBABLE (compiled once, cached),
  its handlers registered as vgg_jax_test_*."""
  library = winograd.load(('-DVGG_JAX_PERTURBABLE',), prefix='vgg_jax_test_')
  function = library.VggJaxPerturb
  function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float]
  yield function
  function(-1, 0, 0, 0.0)


def test_any_one_coefficient_off_by_0_02_percent_fails_the_exactness_test(perturb):
  # Each of the 54 non-zero coefficients, in the forward transform and in its transpose (the
  # gradient's own code): 108 wrong kernels, each of which the test above must fail.
  perturb(-1, 0, 0, 0.0)
  assert max(exactness('vgg_jax_test_').values()) < EXACT_TOLERANCE  # The same arithmetic.
  missed = []
  for handler, (matrix, site) in HANDLER_MATRICES.items():
    for row, col in zip(*np.nonzero(matrix)):
      perturb(site, int(row), int(col), float(2e-4 * matrix[row, col]))
      error = exactness('vgg_jax_test_')[handler]
      if not error > EXACT_TOLERANCE:
        missed.append((handler, int(row), int(col), error))
  perturb(-1, 0, 0, 0.0)
  assert not missed
  assert sum(np.count_nonzero(m) for m, _ in HANDLER_MATRICES.values()) == 108


# ---------------------------------------------------------------------------------------------
# The handlers check their buffers' shapes.

def wrong(handler, operands, result, error, **attributes):
  return pytest.param(handler, operands, result, attributes, error, id=f'{handler}: {error}')


# handler, operand shapes, result shape, attributes, the error expected.
WRONG_SHAPES = [
    wrong('wino_input', [(1, 8, 8, 16)], (36, 5, 16),
          r'wino_input: V is \(36, 5, 16\), expected \(36, 4, 16\)'),
    wrong('wino_input', [(1, 8, 8, 16)], (36, 4, 8), 'wino_input: V is'),
    wrong('wino_input', [(8, 8, 16)], (36, 4, 16), 'rank'),
    wrong('wino_input_t', [(36, 4, 16)], (1, 12, 8, 16), r'wino_input_t: dV is \(36, 4, 16\)'),
    wrong('wino_output', [(36, 4, 8), (8,)], (1, 8, 12, 8), 'wino_output: M is', mode=2),
    wrong('wino_output', [(36, 4, 8), (7,)], (1, 8, 8, 8), 'wino_output: bias is', mode=1),
    wrong('wino_output', [(36, 4, 8), (7,)], (1, 8, 8, 8), 'wino_output: bias is', mode=0),
    wrong('wino_output_t', [(1, 8, 8, 8), (1, 8, 8, 8)], (36, 3, 8), 'wino_output_t: dM is',
          mode=1),
    wrong('wino_output_t', [(1, 8, 8, 8), (1, 8, 4, 8)], (36, 4, 8), 'wino_output_t: y is',
          mode=1),
    wrong('wino_output_t', [(1, 8, 8, 8), (1, 8, 4, 8)], (36, 4, 8), 'wino_output_t: y is',
          mode=0),
    wrong('wino_kernel', [(3, 3, 4, 8), (1,)], (36, 4, 9), 'wino_kernel: U is'),
    wrong('wino_kernel', [(5, 5, 4, 8), (1,)], (36, 4, 8), 'wino_kernel: g is'),
    wrong('wino_kernel_t', [(36, 4, 8)], (3, 3, 4, 9), r'wino_kernel_t: dU is \(36, 4, 8\)'),
    wrong('wino_kernel_t', [(30, 4, 8)], (3, 3, 4, 8), 'wino_kernel_t: dU is'),
    wrong('wino_kernel_t', [(36, 4, 8)], (5, 3, 4, 8), 'wino_kernel_t: dg is'),
    wrong('wino_products', [(36, 10, 8), (36, 1, 8, 16)], (36, 9, 16), 'wino_products: M is'),
    wrong('wino_products', [(36, 10, 8), (36, 2, 8, 16)], (36, 10, 16),
          'wino_products: packed U is'),
    wrong('wino_products', [(36, 10, 8), (36, 1, 8, 16)], (36, 10, 20),
          'wino_products: packed U is'),
    wrong('wino_products', [(30, 10, 8), (36, 1, 8, 16)], (36, 10, 16), 'wino_products: V is'),
]


@pytest.mark.parametrize('handler, operands, result, attributes, error', WRONG_SHAPES)
def test_a_wrong_shape_is_an_error_not_a_write_past_a_buffer(handler, operands, result,
                                                             attributes, error):
  call = jax.ffi.ffi_call(f'{winograd.PREFIX}{handler}',
                          jax.ShapeDtypeStruct(result, jnp.float32))
  with pytest.raises(Exception, match=error):
    jax.block_until_ready(call(*(jnp.ones(shape, jnp.float32) for shape in operands),
                               **{k: np.int32(v) for k, v in attributes.items()}))


# ---------------------------------------------------------------------------------------------
# The compiled library: where it is kept and what is loaded.

@pytest.fixture(scope='module')
def valid_library(tmp_path_factory) -> str:
  """A copy of this machine's compiled kernels, to stand in for a compilation."""
  copy = tmp_path_factory.mktemp('library') / 'winograd.so'
  with winograd._built(winograd.compiler()) as path:
    shutil.copy(path, copy)
  return str(copy)


@pytest.fixture
def compilations(monkeypatch, valid_library) -> list:
  """The libraries "compiled" (copies of `valid_library`), in order."""
  compiled = []

  def compile_(cxx, defines, library):
    del cxx, defines
    compiled.append(library)
    shutil.copy(valid_library, f'{library}.partial')  # As the compiler writes it.
    os.chmod(f'{library}.partial', 0o700)
    os.replace(f'{library}.partial', library)

  monkeypatch.setattr(winograd, '_compile', compile_)
  return compiled


def test_the_cache_folder_is_made_private_and_keeps_the_library(tmp_path, monkeypatch,
                                                                 compilations):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  folder = tmp_path / 'cache' / 'vgg_jax'
  for _ in range(2):
    with winograd._built(winograd.compiler()) as path:
      assert os.path.dirname(path) == str(folder)
      assert ctypes.CDLL(path).WinoInput
  assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
  assert compilations == [path]  # Compiled once, then found.


def test_a_read_only_cache_that_has_the_library_is_used_and_nothing_written(tmp_path,
                                                                            monkeypatch,
                                                                            compilations):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  folder = tmp_path / 'cache' / 'vgg_jax'
  with winograd._built(winograd.compiler()) as cached:
    pass
  os.remove(f'{cached}.lock')  # The library alone, as a cache filled elsewhere may hold it.
  os.chmod(folder, 0o500)
  try:
    # Root may write in a 0500 folder anyway: that nothing was written is asserted below.
    with winograd._built(winograd.compiler()) as path:
      assert path == cached and ctypes.CDLL(path).WinoInput
    assert os.listdir(folder) == [os.path.basename(cached)]
  finally:
    os.chmod(folder, 0o700)
  assert len(compilations) == 1


def _cache_home_is_a_file(tmp_path, monkeypatch):
  (tmp_path / 'file').write_text('')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'file'))


def _nothing_can_be_written_in_the_cache(tmp_path, monkeypatch):
  # As root ignores a folder's permissions, a folder where the lock file should go stands in
  # for a read-only folder: opening the lock fails, as there.
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  name = f'winograd_{winograd._cache_key(winograd.compiler(), ())}.so'
  os.makedirs(tmp_path / 'cache' / 'vgg_jax' / f'{name}.lock', mode=0o700)
  os.chmod(tmp_path / 'cache' / 'vgg_jax', 0o700)


@pytest.mark.parametrize('no_cache', [_cache_home_is_a_file, _nothing_can_be_written_in_the_cache])
def test_without_a_writable_cache_it_compiles_into_a_private_temporary_folder(
    tmp_path, monkeypatch, compilations, valid_library, no_cache):
  no_cache(tmp_path, monkeypatch)
  shared = tmp_path / 'tmp'
  monkeypatch.setattr(tempfile, 'tempdir', str(shared))
  # A library another user planted where a predictable path would have looked for it.
  name = f'winograd_{winograd._cache_key(winograd.compiler(), ())}.so'
  os.makedirs(shared / 'vgg_jax')
  shutil.copy(valid_library, shared / 'vgg_jax' / name)
  with winograd._built(winograd.compiler()) as path:
    folder = os.path.dirname(path)
    assert compilations == [path] and ctypes.CDLL(path).WinoInput
    assert os.path.dirname(folder) == str(shared) and folder != str(shared / 'vgg_jax')
    assert os.path.basename(folder).startswith('vgg_jax_winograd_')
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
  assert not os.path.exists(folder)  # Removed once loaded.


@pytest.mark.parametrize('untrusted', ['group-writable folder', 'world-writable folder',
                                       "another user's folder"])
def test_a_cache_folder_others_could_have_written_is_not_loaded_from(tmp_path, monkeypatch,
                                                                     compilations, untrusted):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  with winograd._built(winograd.compiler()) as planted:  # Someone's library, in place.
    pass
  folder = os.path.dirname(planted)
  if untrusted == 'group-writable folder':
    os.chmod(folder, 0o770)
  elif untrusted == 'world-writable folder':
    os.chmod(folder, 0o777)
  else:
    uid = os.getuid()
    monkeypatch.setattr(os, 'getuid', lambda: uid + 1)
  with winograd._built(winograd.compiler()) as path:
    assert os.path.dirname(path) != folder and compilations == [planted, path]


@pytest.mark.parametrize('untrusted', ['group-writable library', 'a link'])
def test_a_library_others_could_have_written_is_compiled_again(tmp_path, monkeypatch,
                                                              compilations, valid_library,
                                                              untrusted):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  with winograd._built(winograd.compiler()) as library:
    pass
  if untrusted == 'a link':
    os.remove(library)
    os.symlink(valid_library, library)
  else:
    os.chmod(library, 0o770)
  with winograd._built(winograd.compiler()) as path:
    assert path == library and compilations == [library, library]
  assert not os.path.islink(library) and stat.S_IMODE(os.stat(library).st_mode) == 0o700


def _fake_compiler(path, macros) -> str:
  """A "compiler" that predefines `macros` for -march=native."""
  path.write_text('#!/bin/sh\n' + ''.join(f"echo '#define {m} 1'\n" for m in macros))
  path.chmod(0o700)
  return str(path)


def test_the_cache_key_tells_cpus_apart_by_the_features_compiled_for(tmp_path, monkeypatch):
  avx2 = _fake_compiler(tmp_path / 'avx2', ['__x86_64__', '__AVX__', '__AVX2__', '__FMA__'])
  avx512 = _fake_compiler(tmp_path / 'avx512', ['__x86_64__', '__AVX__', '__AVX2__', '__FMA__',
                                                '__AVX512F__'])
  keys = {winograd._cache_key(cxx, ()) for cxx in (avx2, avx512)}
  real_open = open

  def no_cpuinfo(path, *args, **kwargs):
    if str(path).startswith('/proc/cpuinfo'):
      raise PermissionError(path)
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr('builtins.open', no_cpuinfo)  # Where /proc/cpuinfo cannot be read.
  assert {winograd._cache_key(cxx, ()) for cxx in (avx2, avx512)} == keys
  assert len(keys) == 2
  assert winograd._cache_key(avx2, ('-DVGG_JAX_PERTURBABLE',)) not in keys


def test_the_kernels_register_on_first_use():
  # A fresh process whose first call is the convolution itself, not `available()`.
  code = ('import jax.numpy as jnp\nfrom vgg_jax import winograd\n'
          'y = winograd.conv_bias_relu(jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 16, 8)), '
          'jnp.zeros(8))\nprint(float(y[0, 3, 3, 0]))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == '144.0'  # 3 x 3 x 16 ones.
