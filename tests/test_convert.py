"""Imported weights compute what their own framework computes (vgg_jax.convert).

Each source's net is built with fresh random weights, run by that framework (or, for Caffe, by
an independent numpy forward of a hand-written prototxt over hand-encoded protobuf bytes), and
compared with vgg_jax on the converted variables, its input normalisation included.
"""

import os
import re
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vgg_jax
from vgg_jax import convert
from vgg_jax import models
from vgg_jax import preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])


def fresh_rng() -> np.random.Generator:
  return np.random.default_rng(int.from_bytes(os.urandom(4), 'little'))


def rel_err(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def vgg_logits(variables, fields, images_nhwc) -> np.ndarray:
  model = models.VGG(variant=fields['variant'], num_classes=fields['num_classes'],
                     width=fields['width'])
  return np.asarray(jax.jit(model.apply)(variables, jnp.asarray(images_nhwc)))


# ---------------------------------------------------------------------------------------------
# torchvision (where torch is installed).


@pytest.mark.parametrize('name,variant', [('vgg11', 'A'), ('vgg13', 'B'), ('vgg16', 'D'),
                                          ('vgg19', 'E')])
def test_torchvision_vgg_gives_torchs_logits_after_conversion(name, variant):
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  torch.manual_seed(int.from_bytes(os.urandom(4), 'little'))
  net = getattr(torchvision.models, name)(weights=None).eval()
  variables, fields = convert.torchvision_variables(net.state_dict())
  assert fields == dict(variant=variant, width=1.0, num_classes=1000, image_size=224)
  x = fresh_rng().standard_normal((2, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(x)).numpy()
  assert rel_err(vgg_logits(variables, fields, x.transpose(0, 2, 3, 1)), expected) <= 1e-5


def test_torchvision_file_converted_on_the_command_line_applies_torchvision_normalisation(
    tmp_path):
  """vgg16.pth -> CLI -> vgg_jax.load: uint8 photos give torch's logits on its own
  transforms.Normalize'd [0, 1] input."""
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  torch.manual_seed(int.from_bytes(os.urandom(4), 'little'))
  net = torchvision.models.vgg16(weights=None).eval()
  torch.save(net.state_dict(), tmp_path / 'vgg16.pth')
  run_convert('--source=torchvision', f'--input={tmp_path / "vgg16.pth"}',
              f'--output={tmp_path / "vgg16"}', '--variant=D')
  model, variables, prep = vgg_jax.load(str(tmp_path / 'vgg16'))
  images = fresh_rng().integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
  normalize = torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  with torch.no_grad():
    expected = net(normalize(torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0)).numpy()
  actual = model.apply(variables, prep.normalization(jnp.asarray(images)))
  assert rel_err(actual, expected) <= 1e-5
  names = vgg_jax.class_names(str(tmp_path / 'vgg16'))
  assert len(names) == 1000 and names[0] == 'n01440764 tench' and names[281] == 'n02123045 tabby'


def test_batch_normalised_torchvision_vgg_is_refused():
  state = {'features.0.weight': np.zeros((64, 3, 3, 3)), 'features.1.running_mean': np.zeros(64)}
  with pytest.raises(convert.ConversionError, match='batch-normalised'):
    convert.from_torchvision(state)


# ---------------------------------------------------------------------------------------------
# Keras (always: tensorflow, hence keras, is a dependency).


@pytest.fixture(scope='module')
def keras():
  os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
  import keras as keras_module  # pylint: disable=g-import-not-at-top
  return keras_module


def keras_net(keras, name, size):
  keras.utils.set_random_seed(int.from_bytes(os.urandom(4), 'little'))
  return getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                           classifier_activation=None)


def save_legacy_h5(keras, net, path):
  """The Keras 2 HDF5 layout of the released vgg16_weights_tf_dim_ordering_tf_kernels.h5."""
  import h5py  # pylint: disable=g-import-not-at-top
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top
  with h5py.File(path, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, net)


@pytest.mark.parametrize('name,variant,layout', [('VGG16', 'D', 'legacy'),
                                                 ('VGG19', 'E', 'keras3')])
def test_keras_weight_file_gives_keras_logits_on_keras_preprocessing(keras, tmp_path, name,
                                                                     variant, layout):
  """64 x 64 inputs, so fc1 reads a 2 x 2 grid of conv5 features (its flatten order
  matters)."""
  net = keras_net(keras, name, 64)
  path = str(tmp_path / ('w.h5' if layout == 'legacy' else 'w.weights.h5'))
  save_legacy_h5(keras, net, path) if layout == 'legacy' else net.save_weights(path)
  variables, fields = convert.keras_variables(path)
  assert fields == dict(variant=variant, width=1.0, num_classes=1000, image_size=64)
  images = fresh_rng().integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  preprocess_input = getattr(keras.applications, name.lower()).preprocess_input
  expected = np.asarray(net(preprocess_input(images.astype(np.float32)), training=False))
  normalized = convert.normalization('keras')(jnp.asarray(images))
  assert rel_err(vgg_logits(variables, fields, normalized), expected) <= 1e-5


def test_keras_file_without_classifier_is_refused(keras, tmp_path):
  net = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
  save_legacy_h5(keras, net, tmp_path / 'notop.h5')
  with pytest.raises(convert.ConversionError, match='include_top=False'):
    convert.from_keras(str(tmp_path / 'notop.h5'))


# ---------------------------------------------------------------------------------------------
# Caffe: protobuf bytes encoded by hand here, independently of vgg_jax's schema.


def _varint(n: int) -> bytes:
  out = b''
  while True:
    byte, n = n & 0x7F, n >> 7
    out += bytes([byte | (0x80 if n else 0)])
    if not n:
      return out


def _key(number: int, wire_type: int) -> bytes:
  return _varint(number << 3 | wire_type)


def _len(number: int, payload: bytes) -> bytes:
  return _key(number, 2) + _varint(len(payload)) + payload


def _int(number: int, value: int) -> bytes:
  return _key(number, 0) + _varint(value)


def _floats(number: int, values: np.ndarray) -> bytes:
  return _len(number, struct.pack(f'<{values.size}f', *values.ravel()))


def caffe_prototxt(variant: str, width: float, image_size: int, num_classes: int) -> str:
  """A deploy prototxt in Caffe's V1 syntax, as the released VGG_ILSVRC_16_layers_deploy."""
  lines = ['name: "VGG_test"', 'input: "data"', 'input_dim: 1', 'input_dim: 3',
           f'input_dim: {image_size}', f'input_dim: {image_size}']
  bottom = 'data'

  def layer(name, kind, **params):
    nonlocal bottom
    body = ' '.join(f'{k}: {v}' for k, v in params.items())
    lines.append(f'layers {{ bottom: "{bottom}" top: "{name}" name: "{name}" type: {kind} '
                 f'{body} }}')
    bottom = name

  for b, block in enumerate(models.VGG_SPECS[variant], start=1):
    for i, (size, channels) in enumerate(block, start=1):
      layer(f'conv{b}_{i}', 'CONVOLUTION', num_output=models.scaled(channels, width),
            pad=size // 2, kernel_size=size)
      layer(f'relu{b}_{i}', 'RELU')
    layer(f'pool{b}', 'POOLING', pool='MAX', kernel_size=2, stride=2)
  for name, out in (('fc6', models.scaled(4096, width)), ('fc7', models.scaled(4096, width)),
                    ('fc8', num_classes)):
    layer(name, 'INNER_PRODUCT', num_output=out)
    if name != 'fc8':
      layer(f'relu{name[2]}', 'RELU')
      layer(f'drop{name[2]}', 'DROPOUT', dropout_ratio=0.5)
  layer('prob', 'SOFTMAX')
  return '\n'.join(lines)


def parse_prototxt(text: str) -> list[dict]:
  layers = []
  for body in re.findall(r'layers \{(.*?)\}', text):
    fields = dict(re.findall(r'(\w+): "?([\w.]+)"?', body))
    layers.append(fields)
  return layers


def random_blobs(prototxt_layers, rng, grid_cells: int) -> dict[str, list[np.ndarray]]:
  """Caffe-layout weights ((out, in, h, w) kernels, (out, in) fc) for every weight layer;
  fc6 reads `grid_cells` positions of the last convolution's channels."""
  blobs, inputs = {}, 3
  for layer in prototxt_layers:
    out = int(layer.get('num_output', 0))
    if layer['type'] == 'CONVOLUTION':
      k = int(layer['kernel_size'])
      weight = rng.normal(0, np.sqrt(2 / (k * k * inputs)), (out, inputs, k, k))
    elif layer['type'] == 'INNER_PRODUCT':
      inputs *= grid_cells if layer['name'] == 'fc6' else 1
      weight = rng.normal(0, np.sqrt(2 / inputs), (out, inputs))
    else:
      continue
    blobs[layer['name']] = [weight.astype(np.float32), rng.normal(0, 0.1, out).astype(np.float32)]
    inputs = out
  return blobs


def caffemodel_v1(prototxt_layers, blobs) -> bytes:
  """NetParameter with V1 `layers` (field 2), blobs as num/channels/height/width (the 2014
  VGG files); non-weight layers and layer parameters included, to be skipped."""
  types = {'CONVOLUTION': 4, 'RELU': 18, 'POOLING': 17, 'INNER_PRODUCT': 14, 'DROPOUT': 6,
           'SOFTMAX': 20}
  net = _len(1, b'VGG_test')
  for layer in prototxt_layers:
    body = _len(2, layer['bottom'].encode()) + _len(3, layer['top'].encode())
    body += _len(4, layer['name'].encode()) + _int(5, types[layer['type']])
    for blob in blobs.get(layer['name'], []):
      shape = (1,) * (4 - blob.ndim) + blob.shape
      body += _len(6, b''.join(_int(n, d) for n, d in zip((1, 2, 3, 4), shape)) +
                   _floats(5, blob))
    if 'num_output' in layer:  # convolution_param (10) / inner_product_param (17)
      body += _len(10 if layer['type'] == 'CONVOLUTION' else 17, _int(1, int(layer['num_output'])))
    net += _len(2, body)
  return net


def caffemodel_v2(prototxt_layers, blobs) -> bytes:
  """NetParameter with current `layer` (field 100), blobs with BlobShape (field 7)."""
  types = {'CONVOLUTION': 'Convolution', 'RELU': 'ReLU', 'POOLING': 'Pooling',
           'INNER_PRODUCT': 'InnerProduct', 'DROPOUT': 'Dropout', 'SOFTMAX': 'Softmax'}
  net = _len(1, b'VGG_test')
  for layer in prototxt_layers:
    body = _len(1, layer['name'].encode()) + _len(2, types[layer['type']].encode())
    body += _len(3, layer['bottom'].encode()) + _len(4, layer['top'].encode())
    for blob in blobs.get(layer['name'], []):
      dims = b''.join(_varint(d) for d in blob.shape)
      body += _len(7, _len(7, _len(1, dims)) + _floats(5, blob))
    net += _len(100, body)
  return net


def caffe_forward(prototxt_layers, blobs, bgr_minus_mean: np.ndarray) -> np.ndarray:
  """Caffe's semantics in float64 numpy, NCHW: conv (zero pad), ReLU, 2x2/2 max-pool,
  InnerProduct on the (channel, row, column) flatten. Dropout is the identity at test time."""
  x = bgr_minus_mean.transpose(0, 3, 1, 2).astype(np.float64)
  for layer in prototxt_layers:
    kind = layer['type']
    if kind == 'CONVOLUTION':
      w, b = blobs[layer['name']]
      pad = int(layer['pad'])
      k = w.shape[-1]
      padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
      windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))
      x = np.einsum('nchwij,ocij->nohw', windows, w.astype(np.float64)) + b[None, :, None, None]
    elif kind == 'RELU':
      x = np.maximum(x, 0)
    elif kind == 'POOLING':
      n, c, h, w_ = x.shape
      x = x.reshape(n, c, h // 2, 2, w_ // 2, 2).max(axis=(3, 5))
    elif kind == 'INNER_PRODUCT':
      w, b = blobs[layer['name']]
      x = x.reshape(x.shape[0], -1) @ w.astype(np.float64).T + b
  return x


def make_caffe_net(variant='D', width=1 / 16, image_size=64, num_classes=5):
  rng = fresh_rng()
  layers = parse_prototxt(caffe_prototxt(variant, width, image_size, num_classes))
  return layers, random_blobs(layers, rng, (image_size // 32) ** 2)


@pytest.mark.parametrize('encoding', ['v1', 'v2'])
def test_caffemodel_gives_the_prototxt_nets_output_on_bgr_mean_subtracted_input(encoding):
  """A 1/16-width net D on 64 x 64 images: fc6 reads a 2 x 2 grid in Caffe's order."""
  layers, blobs = make_caffe_net()
  data = (caffemodel_v1 if encoding == 'v1' else caffemodel_v2)(layers, blobs)
  variables, fields = convert.caffe_variables(data)
  assert fields == dict(variant='D', width=1 / 16, num_classes=5, image_size=64)
  images = fresh_rng().integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  expected = caffe_forward(layers, blobs, images[..., ::-1] - CAFFE_MEAN_BGR)
  normalized = convert.normalization('caffe')(jnp.asarray(images))
  assert rel_err(vgg_logits(variables, fields, normalized), expected) <= 1e-5


def run_convert(*args) -> subprocess.CompletedProcess:
  result = subprocess.run([sys.executable, '-m', 'vgg_jax.convert', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_caffe_cli_writes_a_checkpoint_that_load_runs_on_rgb_photos(tmp_path, photos):
  layers, blobs = make_caffe_net(variant='A', num_classes=7)
  (tmp_path / 'net.caffemodel').write_bytes(caffemodel_v1(layers, blobs))
  run_convert('--source=caffe', f'--input={tmp_path / "net.caffemodel"}',
              f'--output={tmp_path / "out"}')
  model, variables, prep = vgg_jax.load(str(tmp_path / 'out'))
  assert (model.variant, model.num_classes, prep.image_size) == ('A', 7, 64)
  assert prep.normalization == preprocess.Normalization(
      (123.68, 116.779, 103.939), (1.0, 1.0, 1.0), 'BGR')
  photo = prep.crop(photos['chelsea'][:64 * 3, :64 * 3][::3, ::3])
  expected = caffe_forward(layers, blobs, photo[None, ..., ::-1] - CAFFE_MEAN_BGR)
  assert rel_err(model.apply(variables, prep.normalization(jnp.asarray(photo[None]))),
                 expected) <= 1e-5
  record = (tmp_path / 'out' / 'source.json').read_text()
  assert '"source": "caffe"' in record and '"BGR"' in record
  # The output directory is never overwritten.
  result = subprocess.run([sys.executable, '-m', 'vgg_jax.convert', '--source=caffe',
                           f'--input={tmp_path / "net.caffemodel"}',
                           f'--output={tmp_path / "out"}'], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0 and 'already holds checkpoints' in result.stderr


def test_wrong_variant_and_files_of_another_kind_are_refused_with_what_they_are(tmp_path):
  layers, blobs = make_caffe_net(variant='E')
  data = caffemodel_v1(layers, blobs)
  with pytest.raises(convert.ConversionError, match='weights have 16 convolutions, which is net E'):
    convert.from_caffe(data, variant='D')
  with pytest.raises(convert.ConversionError, match='Caffe'):
    convert.from_caffe(b'\xff\xff\xff not a protobuf')
  (tmp_path / 'weights.h5').write_text('not HDF5')
  with pytest.raises(convert.ConversionError, match='not an HDF5 file'):
    convert.from_keras(str(tmp_path / 'weights.h5'))
