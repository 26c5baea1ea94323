"""Appendix B's linear probe (`vgg_jax.linear_probe`) on a folder of photos it chooses the
splits of."""

import jax
from PIL import Image

from vgg_jax import checkpoints
from vgg_jax import linear_probe
from vgg_jax import models
from vgg_jax import steps


def photo_folder(root, photos, splits: dict[str, int]) -> str:
  """ROOT/<split>/<class>/<n>.png: crops of two photos, a class each."""
  for split, count in splits.items():
    for label, name in enumerate(('astronaut', 'coffee')):
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        top, left = 9 * i + 40 * split.startswith('v'), 13 * i
        crop = photos[name][top:top + 48, left:left + 56]
        Image.fromarray(crop).save(root / split / name / f'{i}.png')
  return str(root)


def test_probe_reads_the_splits_it_is_given_not_the_training_runs(tmp_path, digits_config,
                                                                 photos):
  """The digits net was trained with eval_split='test'; the folder has train and val only."""
  config = digits_config.copy_and_resolve_references()
  config.update(variant='A', width=1 / 16)
  params = steps.init_params(models.create_model(config), jax.random.key(0),
                             jax.numpy.zeros((1, 32, 32, 3)))
  checkpoints.save_params(str(tmp_path / 'net'), params, config)
  root = photo_folder(tmp_path / 'photos', photos, {'train': 6, 'val': 3})
  result = linear_probe.probe(str(tmp_path / 'net'), f'folder:{root}', scales=(32,),
                              train_split='train', test_split='val',
                              data_dir=str(tmp_path / 'tfds'))
  assert (result['num_train'], result['num_test']) == (12, 6)
  assert 0.0 <= result['top1_error'] <= 1.0
