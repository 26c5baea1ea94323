"""Imports released VGG weights into vgg_jax: torchvision, Keras and the original Caffe models.

  python -m vgg_jax.convert --source=torchvision --input=vgg16.pth --output=DIR [--variant=D]
  python -m vgg_jax.convert --source=keras --input=vgg16_weights_tf_dim_ordering_tf_kernels.h5 ...
  python -m vgg_jax.convert --source=caffe --input=VGG_ILSVRC_16_layers.caffemodel ...

DIR then holds what a training run leaves: an Orbax checkpoint (DIR/checkpoints/0) with its
config, which `python -m vgg_jax.evaluate --workdir=DIR`, `config.init_from=DIR` and
`vgg_jax.load(DIR)` take as they are; DIR/classes.json, the class names; and DIR/source.json,
where the weights came from and the input they expect in the source's own terms. That input is
recorded in the config (`mean_rgb`, `std_rgb`, `channel_order`) and applied by everything that
runs the net, so the weights see the pixels they were trained on.

The layouts differ from vgg_jax's only in axis order: convolution kernels are (out, in, h, w)
in torch and Caffe, HWIO here and in Keras; fc6 flattens conv5's output in (channel, row,
column) order in torch and Caffe, (row, column, channel) here and in Keras (`models.GridDense`).
Variant, width, fc6 grid (hence training image size) and class count are read off the shapes.
"""

import hashlib
import json
import os
import re
from typing import Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from vgg_jax import models
from vgg_jax import preprocess
from vgg_jax import run_files

SOURCES = ('torchvision', 'keras', 'caffe')
# The input each source's released weights were trained on, in its own terms, and as the
# `preprocess.Normalization` that reproduces it from uint8 RGB pixels.
SOURCE_INPUT = {
    'torchvision': {'channel_order': 'RGB', 'value_range': [0, 1],
                    'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]},
    'keras': {'channel_order': 'BGR', 'value_range': [0, 255],
              'mean': [103.939, 116.779, 123.68], 'std': [1, 1, 1]},
    'caffe': {'channel_order': 'BGR', 'value_range': [0, 255],
              'mean': [103.939, 116.779, 123.68], 'std': [1, 1, 1]},
}
# Training scale S of the released ImageNet weights: the Caffe models (and Keras', converted
# from them) are the paper's nets D and E trained with S in [256, 512]; torchvision's were
# trained on random-resized crops and are tested at S = 256.
SOURCE_TRAIN_SCALE = {'torchvision': 256, 'keras': (256, 512), 'caffe': (256, 512)}
IMAGENET_CLASSES = os.path.join(os.path.dirname(__file__), 'imagenet_classes.txt')


class ConversionError(ValueError):
  """The input is not a VGG of Table 1 in the layout the source framework writes."""


def normalization(source: str) -> preprocess.Normalization:
  """`SOURCE_INPUT[source]` as vgg_jax applies it: 0-255 units, RGB order."""
  spec = SOURCE_INPUT[source]
  to_255 = 255.0 / spec['value_range'][1]
  order = slice(None, None, -1) if spec['channel_order'] == 'BGR' else slice(None)
  return preprocess.Normalization(
      tuple(float(to_255 * m) for m in spec['mean'][order]),
      tuple(float(to_255 * s) for s in spec['std'][order]), spec['channel_order'])


def imagenet_class_names() -> list[str]:
  """ILSVRC-2012's 1,000 classes in label order: 'n01440764 tench', ..."""
  with open(IMAGENET_CLASSES) as f:
    return [' '.join(line.split('\t')).strip() for line in f if not line.startswith('#')]


# ---------------------------------------------------------------------------------------------
# Assembly: weight layers in network order -> a checked vgg_jax parameter tree.


def _conv_kernel_sizes(variant: str) -> list[int]:
  return [spec[0] for block in models.VGG_SPECS[variant] for spec in block
          if spec != models.LRN]


def _variant_of(kernel_sizes: Sequence[int], requested: Optional[str]) -> str:
  matches = [v for v in models.VARIANTS
             if v != 'A-LRN' and _conv_kernel_sizes(v) == list(kernel_sizes)]
  if requested is not None:
    if requested not in models.VARIANTS:
      raise ConversionError(f'variant={requested!r}: expected one of '
                            f'{", ".join(models.VARIANTS)}.')
    if _conv_kernel_sizes(requested) != list(kernel_sizes):
      found = (f'net {matches[0]}' if matches
               else f'no net of Table 1 (kernel sizes {list(kernel_sizes)})')
      raise ConversionError(
          f'variant={requested!r} has {len(_conv_kernel_sizes(requested))} convolutions; the '
          f'weights have {len(kernel_sizes)} convolutions, which is {found}.')
    return requested
  if not matches:
    raise ConversionError(f'{len(kernel_sizes)} convolutions of kernel sizes '
                          f'{list(kernel_sizes)} are no VGG net of Table 1.')
  return matches[0]


def assemble(convs: Sequence[tuple[np.ndarray, np.ndarray]],
             fcs: Sequence[tuple[np.ndarray, np.ndarray]], variant: Optional[str] = None,
             fc6_channels_first: bool = False) -> tuple[dict, dict]:
  """vgg_jax variables from weight layers in network order, every shape checked.

  convs: (HWIO kernel, bias) per convolution; fcs: ((in, out) kernel, bias) for fc6, fc7, fc8.
  `fc6_channels_first`: fc6's rows follow a (channel, row, column) flatten of conv5.
  Returns ({'params': tree}, the net's fields: variant, width, num_classes, image_size).
  """
  if len(fcs) != 3:
    raise ConversionError(f'expected 3 fully-connected layers (fc6, fc7, fc8), found '
                          f'{len(fcs)}; the classifier must be included.')
  variant = _variant_of([k.shape[0] for k, _ in convs], variant)
  width = convs[0][0].shape[-1] / 64
  conv5_channels = convs[-1][0].shape[-1]
  fc6_kernel = fcs[0][0]
  grid = int(round(np.sqrt(fc6_kernel.shape[0] / conv5_channels)))
  if grid * grid * conv5_channels != fc6_kernel.shape[0]:
    raise ConversionError(f'fc6 has {fc6_kernel.shape[0]} inputs, not a square grid of '
                          f'{conv5_channels}-channel conv5 features.')
  if fc6_channels_first:
    fc6_kernel = (fc6_kernel.reshape(conv5_channels, grid, grid, -1).transpose(1, 2, 0, 3)
                  .reshape(fc6_kernel.shape))
  fields = dict(variant=variant, width=width, num_classes=int(fcs[2][0].shape[-1]),
                image_size=grid * models.DOWNSAMPLING)
  names = models.layer_names(variant)
  weights = list(convs) + [(fc6_kernel, fcs[0][1])] + list(fcs[1:])
  params = {name: {'kernel': np.asarray(k, np.float32), 'bias': np.asarray(b, np.float32)}
            for name, (k, b) in zip(names, weights)}
  model = models.VGG(variant=variant, num_classes=fields['num_classes'], width=width)
  dummy = jax.ShapeDtypeStruct((1, fields['image_size'], fields['image_size'], 3), np.float32)
  expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), dummy)['params']
  for name in names:
    for kind in ('kernel', 'bias'):
      if params[name][kind].shape != expected[name][kind].shape:
        raise ConversionError(
            f'{name}/{kind} has shape {params[name][kind].shape}; net {variant} at width '
            f'{width:g} with {fields["num_classes"]} classes and {fields["image_size"]}-pixel '
            f'crops needs {expected[name][kind].shape}.')
  return {'params': params}, fields


# ---------------------------------------------------------------------------------------------
# torchvision.


def from_torchvision(state_dict: Mapping, variant: Optional[str] = None) -> dict:
  """torchvision vgg11/13/16/19 (nets A/B/D/E) state_dict -> vgg_jax variables.

  torchvision's classifier follows an adaptive average pool to 7 x 7, the identity at 224 x
  224 (and any size whose conv5 grid is 7 x 7); at other sizes vgg_jax's dense head slides fc6
  over the grid instead (Sec. 3.2).
  """
  return torchvision_variables(state_dict, variant)[0]


def torchvision_variables(state_dict: Mapping, variant: Optional[str] = None):
  """`from_torchvision`, with the net's fields (see `assemble`)."""
  state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
  if any('running_mean' in k for k in state_dict):
    raise ConversionError('this is a batch-normalised VGG (vgg16_bn, ...): the paper\'s nets '
                          'have no batch normalisation; convert vgg11/13/16/19.')
  array = lambda key: np.asarray(state_dict[key].detach().cpu().numpy()
                                 if hasattr(state_dict[key], 'detach') else state_dict[key])
  layer = lambda prefix: sorted({int(m.group(1)) for k in state_dict
                                 if (m := re.fullmatch(prefix + r'\.(\d+)\.weight', k))})
  conv_indices, fc_indices = layer('features'), layer('classifier')
  if not conv_indices:
    raise ConversionError(f'no features.N.weight tensors: not a torchvision VGG state_dict '
                          f'(keys: {", ".join(list(state_dict)[:6])}, ...).')
  convs = [(array(f'features.{i}.weight').transpose(2, 3, 1, 0), array(f'features.{i}.bias'))
           for i in conv_indices]
  fcs = [(array(f'classifier.{i}.weight').T, array(f'classifier.{i}.bias')) for i in fc_indices]
  return assemble(convs, fcs, variant, fc6_channels_first=True)


def load_torch_file(path: str) -> Mapping:
  """A torch state_dict file, loaded with weights_only=True (no pickled code runs)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError('--source=torchvision reads .pth files with torch; pip install '
                          'torch (the CPU wheel is enough).') from e
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises several kinds: not a zip, unpickling refused, ...
    raise ConversionError(f'{path} does not load as a torch state_dict with weights_only=True '
                          f'({type(e).__name__}: {e}).') from e
  for key in ('state_dict', 'model'):
    if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
      state = state[key]
  return state


# ---------------------------------------------------------------------------------------------
# Keras.


def _natural_key(name: str):
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def keras_layers(path: str) -> list[tuple[str, list[np.ndarray]]]:
  """(layer name, weights) of every layer with weights of a Keras weight file, in order.

  Reads the Keras 2 HDF5 layout of the released files (`layer_names`, `weight_names`
  attributes, possibly under `model_weights`) and Keras 3's `.weights.h5` (layers/NAME/vars/i,
  layers numbered in creation order).
  """
  import h5py  # pylint: disable=g-import-not-at-top
  decode = lambda s: s.decode() if isinstance(s, bytes) else str(s)
  try:
    f = h5py.File(path, 'r')
  except OSError as e:
    raise ConversionError(f'{path} is not an HDF5 file ({e}); --source=keras reads the .h5 '
                          'weight files of keras.applications.') from e
  with f:
    group = f['model_weights'] if 'model_weights' in f else f
    if 'layer_names' in group.attrs:
      layers = []
      for name in map(decode, group.attrs['layer_names']):
        weight_names = [decode(w) for w in group[name].attrs.get('weight_names', [])]
        if weight_names:
          layers.append((name, [np.asarray(group[name][w]) for w in weight_names]))
      return layers
    if 'layers' in group:
      layers = []
      for name in sorted(group['layers'], key=_natural_key):
        variables = group['layers'][name].get('vars')
        if variables is not None and len(variables):
          layers.append((name, [np.asarray(variables[i])
                                for i in sorted(variables, key=_natural_key)]))
      return layers
  raise ConversionError(f'{path} is an HDF5 file but not Keras weights (no layer_names '
                        'attribute, no layers/ group).')


def from_keras(path_or_layers, variant: Optional[str] = None) -> dict:
  """Keras VGG16/VGG19 weights (`keras.applications`, include_top=True) -> vgg_jax variables.

  Keras kernels are HWIO and its Flatten is (row, column, channel): both vgg_jax's already.
  """
  return keras_variables(path_or_layers, variant)[0]


def keras_variables(path_or_layers, variant: Optional[str] = None):
  """`from_keras`, with the net's fields (see `assemble`)."""
  layers = (keras_layers(path_or_layers) if isinstance(path_or_layers, (str, os.PathLike))
            else list(path_or_layers))
  convs = [tuple(w) for _, w in layers if w[0].ndim == 4]
  fcs = [tuple(w) for _, w in layers if w[0].ndim == 2]
  if convs and not fcs:
    raise ConversionError('the file holds convolutions only (include_top=False, "notop"); '
                          'convert the file with the classifier (fc1, fc2, predictions).')
  if any(w[0].shape[0] != w[0].shape[1] for w in convs):
    raise ConversionError('convolution kernels are not (h, w, in, out): a channels_first '
                          '("th") file; convert the tf-ordering one.')
  return assemble(convs, fcs, variant)


# ---------------------------------------------------------------------------------------------
# Caffe.


def _caffe_messages():
  """The few messages of caffe.proto that hold weights, built at run time: no Caffe, no
  generated code. Field numbers are caffe.proto's; everything else in a file is skipped."""
  from google.protobuf import descriptor_pb2  # pylint: disable=g-import-not-at-top
  from google.protobuf import descriptor_pool  # pylint: disable=g-import-not-at-top
  from google.protobuf import message_factory  # pylint: disable=g-import-not-at-top
  f = descriptor_pb2.FieldDescriptorProto
  schema = {
      'BlobShape': [('dim', 1, f.TYPE_INT64, f.LABEL_REPEATED, None)],
      'BlobProto': [('num', 1, f.TYPE_INT32, f.LABEL_OPTIONAL, None),
                    ('channels', 2, f.TYPE_INT32, f.LABEL_OPTIONAL, None),
                    ('height', 3, f.TYPE_INT32, f.LABEL_OPTIONAL, None),
                    ('width', 4, f.TYPE_INT32, f.LABEL_OPTIONAL, None),
                    ('data', 5, f.TYPE_FLOAT, f.LABEL_REPEATED, None),
                    ('shape', 7, f.TYPE_MESSAGE, f.LABEL_OPTIONAL, 'BlobShape'),
                    ('double_data', 8, f.TYPE_DOUBLE, f.LABEL_REPEATED, None)],
      'LayerParameter': [('name', 1, f.TYPE_STRING, f.LABEL_OPTIONAL, None),
                         ('type', 2, f.TYPE_STRING, f.LABEL_OPTIONAL, None),
                         ('blobs', 7, f.TYPE_MESSAGE, f.LABEL_REPEATED, 'BlobProto')],
      'V1LayerParameter': [('name', 4, f.TYPE_STRING, f.LABEL_OPTIONAL, None),
                           ('type', 5, f.TYPE_INT32, f.LABEL_OPTIONAL, None),
                           ('blobs', 6, f.TYPE_MESSAGE, f.LABEL_REPEATED, 'BlobProto')],
      'NetParameter': [('name', 1, f.TYPE_STRING, f.LABEL_OPTIONAL, None),
                       ('layers', 2, f.TYPE_MESSAGE, f.LABEL_REPEATED, 'V1LayerParameter'),
                       ('layer', 100, f.TYPE_MESSAGE, f.LABEL_REPEATED, 'LayerParameter')],
  }
  file = descriptor_pb2.FileDescriptorProto(name='vgg_jax_caffe.proto', package='vgg_jax_caffe')
  for message, fields in schema.items():
    proto = file.message_type.add(name=message)
    for name, number, kind, label, type_name in fields:
      field = proto.field.add(name=name, number=number, type=kind, label=label)
      if type_name:
        field.type_name = f'.vgg_jax_caffe.{type_name}'
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName('vgg_jax_caffe.NetParameter'))


# caffe.proto's V1LayerParameter.LayerType numbers for the two layers with weights.
CAFFE_V1_CONVOLUTION, CAFFE_V1_INNER_PRODUCT = 4, 14


def _blob_array(blob) -> np.ndarray:
  shape = (tuple(blob.shape.dim) if blob.HasField('shape')
           else (blob.num, blob.channels, blob.height, blob.width))
  data = np.asarray(blob.data if len(blob.data) else blob.double_data, np.float32)
  if data.size != np.prod(shape):
    raise ConversionError(f'a blob of shape {shape} holds {data.size} values.')
  return data.reshape(shape)


def caffe_layers(data: bytes) -> list[tuple[str, str, list[np.ndarray]]]:
  """(name, 'conv' or 'fc', blobs) of the convolution and inner-product layers of a serialised
  Caffe NetParameter, V1 (`layers`, as the 2014 VGG models) or current (`layer`) format."""
  net = _caffe_messages()()
  try:
    net.ParseFromString(data)
  except Exception as e:  # protobuf's DecodeError and friends.
    raise ConversionError(f'not a Caffe model: the protobuf does not parse ({e}).') from e
  kinds = {'Convolution': 'conv', 'InnerProduct': 'fc',
           CAFFE_V1_CONVOLUTION: 'conv', CAFFE_V1_INNER_PRODUCT: 'fc'}
  layers = [(layer.name, kinds.get(layer.type), [_blob_array(b) for b in layer.blobs])
            for layer in list(net.layers) + list(net.layer)]
  return [(name, kind, blobs) for name, kind, blobs in layers if kind and blobs]


def from_caffe(model: bytes, variant: Optional[str] = None) -> dict:
  """The original VGG-16/19 .caffemodel (its bytes) -> vgg_jax variables.

  Kernels are (out, in, h, w); fc weights (out, in), stored 4-D (1, 1, out, in) in the old
  format; fc6 flattens pool5 in (channel, row, column) order.
  """
  return caffe_variables(model, variant)[0]


def caffe_variables(model: bytes, variant: Optional[str] = None):
  """`from_caffe`, with the net's fields (see `assemble`)."""
  layers = caffe_layers(model)
  if not layers:
    raise ConversionError('the Caffe model holds no convolution or inner-product weights (a '
                          'deploy .prototxt rather than the .caffemodel?).')
  convs = [(b[0].transpose(2, 3, 1, 0), b[1].reshape(-1)) for _, kind, b in layers
           if kind == 'conv']
  fcs = [(b[0].reshape(b[0].shape[-2:]).T, b[1].reshape(-1))
         for _, kind, b in layers if kind == 'fc']
  return assemble(convs, fcs, variant, fc6_channels_first=True)


# ---------------------------------------------------------------------------------------------
# Writing a converted checkpoint.


def convert_file(source: str, path: str, variant: Optional[str] = None):
  """(variables, fields) of the weight file `path` from `source`."""
  if source not in SOURCES:
    raise ConversionError(f'--source={source!r}: expected one of {", ".join(SOURCES)}.')
  if not os.path.isfile(path):
    raise ConversionError(f'--input={path!r}: no such file.')
  if source == 'torchvision':
    return torchvision_variables(load_torch_file(path), variant)
  if source == 'keras':
    return keras_variables(path, variant)
  with open(path, 'rb') as f:
    return caffe_variables(f.read(), variant)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def save(output: str, variables: dict, fields: dict, source: str,
         input_path: Optional[str] = None) -> str:
  """Writes variables as a vgg_jax checkpoint directory (step 0), with the config that runs
  them, class names and the source record; returns the directory. An existing checkpoint in
  `output` is never overwritten."""
  # Imported here: the conversion itself needs neither ml_collections nor Orbax.
  from vgg_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from vgg_jax import default_config  # pylint: disable=g-import-not-at-top
  if os.path.exists(checkpoints.checkpoint_dir(output)):
    raise ConversionError(f'--output={output!r} already holds checkpoints; choose a new '
                          'directory (nothing there was changed).')
  config = default_config.get_config()
  config.update(fields)
  norm = normalization(source)
  config.mean_rgb, config.std_rgb, config.channel_order = (
      norm.mean_rgb, norm.std_rgb, norm.channel_order)
  config.train_scale = SOURCE_TRAIN_SCALE[source]
  if fields['num_classes'] != 1000:
    config.dataset = 'unknown'
  checkpoints.save_params(output, variables['params'], config)
  names = (imagenet_class_names() if fields['num_classes'] == 1000
           else [str(i) for i in range(fields['num_classes'])])
  run_files.write_class_names(output, names)
  record = {'source': source, 'input': os.path.abspath(input_path) if input_path else None,
            'sha256': _sha256(input_path) if input_path else None, **fields,
            'expected_input': SOURCE_INPUT[source],
            'applied_as': {'mean_rgb': norm.mean_rgb, 'std_rgb': norm.std_rgb,
                           'channel_order': norm.channel_order, 'units': '0-255, RGB order'}}
  with open(os.path.join(output, run_files.SOURCE_RECORD), 'w') as f:
    json.dump(record, f, indent=2)
  return output


FLAGS = flags.FLAGS



def define_flags() -> None:
  """The CLI's flags, defined when it runs, not when the module is imported."""
  flags.DEFINE_enum('source', None, SOURCES, 'Framework that wrote --input.')
  flags.DEFINE_string('input', None, 'The weight file: .pth (torchvision), .h5 (Keras), '
                      '.caffemodel (Caffe).')
  flags.DEFINE_string('output', None, 'New directory for the vgg_jax checkpoint.')
  flags.DEFINE_string('variant', None, 'Expected net (A, B, C, D, E); default: read off the '
                      'weights.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  from vgg_jax import cli  # pylint: disable=g-import-not-at-top
  cli.setup()
  try:
    variables, fields = convert_file(FLAGS.source, FLAGS.input, FLAGS.variant)
    save(FLAGS.output, variables, fields, FLAGS.source, FLAGS.input)
  except ConversionError as e:
    raise SystemExit(f'vgg_jax.convert: {e}') from None
  logging.info('Converted %s (%s): net %s, width %g, %d classes, %d-pixel crops -> %s. '
               'Evaluate with python -m vgg_jax.evaluate --workdir=%s', FLAGS.input,
               FLAGS.source, fields['variant'], fields['width'], fields['num_classes'],
               fields['image_size'], FLAGS.output, FLAGS.output)


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['source', 'input', 'output'])
  from vgg_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
