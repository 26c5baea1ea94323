"""Transfer learning: imported weights fine-tuned on a folder of real photos, end to end."""

import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

import vgg_jax
from experiments import digits
from tests import test_convert
from vgg_jax import checkpoints
from vgg_jax import convert
from vgg_jax import errors
from vgg_jax import init_from
from vgg_jax import plots
from vgg_jax import train

# Folder class -> bundled photo whose crops it holds.
CLASSES = {'astronaut': 'astronaut', 'cat': 'chelsea', 'coffee': 'coffee'}


def make_folder(root, photos, rng, per_class=(('train', 8), ('val', 8))):
  """ROOT/{train,val}/<class>/*.jpg: random crops of 100-200 pixels of each class's photo."""
  for split, count in per_class:
    for name, photo_name in CLASSES.items():
      photo = photos[photo_name]
      os.makedirs(root / split / name)
      for i in range(count):
        size = int(rng.integers(100, 200))
        top = int(rng.integers(0, photo.shape[0] - size))
        left = int(rng.integers(0, photo.shape[1] - size))
        Image.fromarray(photo[top:top + size, left:left + size]).save(
            root / split / name / f'{i}.jpg', quality=90)


def converted_caffe_net(directory):
  """A 1/16-width net D on 64 x 64 crops, 5 classes, random weights, imported from Caffe;
  activations of the order of one, as in a trained net."""
  layers, blobs = test_convert.make_caffe_net(variant='D', num_classes=5)
  blobs['conv1_1'][0] /= 64  # He-scaled for unit inputs; pixels minus the mean are ~64.
  variables, fields = convert.caffe_variables(test_convert.caffemodel_v1(layers, blobs))
  convert.save(str(directory), variables, fields, 'caffe')
  return variables['params']


def finetune_config(root, source, data_dir, **overrides):
  config = digits.get_config()
  config.update(dataset=f'folder:{root}', data_dir=str(data_dir), eval_split='val',
                num_classes=len(CLASSES), image_size=64, train_scale=(64, 96), width=1 / 16,
                random_flip=True, init_from=str(source), init_mode='finetune',
                frozen_layers='conv', batch_size=16, eval_batch_size=16, dense_batch_size=8,
                multicrop_batch_size=8, dense_size_step=32, num_train_steps=80,
                log_every_steps=10, eval_every_steps=40, checkpoint_every_steps=80,
                learning_rate=0.01, dropout_rate=0.0, eval_protocols='single', init='paper')
  config.update(overrides)
  return config


@pytest.mark.slow
def test_imported_net_finetuned_on_a_photo_folder_with_frozen_convolutions(tmp_path, photos):
  rng = np.random.default_rng(int.from_bytes(os.urandom(4), 'little'))
  make_folder(tmp_path / 'photos', photos, rng)
  source = converted_caffe_net(tmp_path / 'imported')
  workdir = tmp_path / 'finetuned'
  config = finetune_config(tmp_path / 'photos', tmp_path / 'imported', tmp_path / 'tfds')
  result = train.train_and_evaluate(config, str(workdir))

  saved = checkpoints.load_config(str(workdir))
  # The imported net's input normalisation (Caffe's BGR) was adopted, not digits' mean.
  assert (saved.channel_order, tuple(saved.mean_rgb)) == ('BGR', (123.68, 116.779, 103.939))
  params = jax.device_get(checkpoints.restore_params(str(workdir), saved))
  for layer in source:
    if layer.startswith('conv'):
      for kind in ('kernel', 'bias'):
        np.testing.assert_array_equal(params[layer][kind], source[layer][kind])
  assert not np.array_equal(params['fc7']['kernel'], source['fc7']['kernel'])
  assert params['fc8']['kernel'].shape == (256, 3)
  assert json.loads((workdir / 'classes.json').read_text()) == sorted(CLASSES)

  # fc6-fc8 learn the three photos from the frozen features: the training loss falls.
  loss = plots.read_scalars(str(workdir))['train/loss'][1]
  assert loss[-3:].mean() < loss[:3].mean() - 0.02, loss
  assert result['num_examples'] == 24
  model, variables, prep = vgg_jax.load(str(workdir))
  assert prep.normalization.channel_order == 'BGR'
  val_cat = np.asarray(Image.open(tmp_path / 'photos' / 'val' / 'cat' / '0.jpg'))
  (top,) = vgg_jax.predict(model, variables, val_cat, prep, k=3,
                           class_names=vgg_jax.class_names(str(workdir)))
  assert sorted(t['name'] for t in top) == sorted(CLASSES)
  assert abs(sum(t['probability'] for t in top) - 1) < 1e-5


def test_finetune_needs_the_same_net_but_not_the_same_classes(tmp_path):
  converted_caffe_net(tmp_path / 'imported')
  config = finetune_config(tmp_path, tmp_path / 'imported', tmp_path / 'tfds')
  init_from.check_init_from(config)  # 5 classes there, 3 here: fine.
  config.init_mode = 'all'
  with pytest.raises(errors.ConfigError, match='num_classes=5.*init_mode=all'):
    init_from.check_init_from(config)
  config.init_mode, config.variant = 'finetune', 'E'
  with pytest.raises(errors.ConfigError, match="variant='D'.*init_mode=finetune"):
    init_from.check_init_from(config)
