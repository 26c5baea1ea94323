"""A small tfds dataset of real photographs in many aspect ratios, for the test protocol.

Crops of the photos scikit-image and scikit-learn bundle, landscape, portrait, square and
panoramic (beyond dense_max_aspect), 3 classes; the 'validation' split has 13 images (not a
multiple of any batch the tests use).
"""

import numpy as np
import tensorflow_datasets as tfds

# (height, width) of each validation image; a few share a shape, most do not.
VALIDATION_SHAPES = ((120, 180), (180, 120), (150, 150), (100, 260), (130, 170), (170, 130),
                     (128, 128), (110, 200), (90, 300), (140, 180), (200, 140), (120, 160),
                     (160, 100))


def _photos() -> list[np.ndarray]:
  import skimage.data  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  sample = datasets.load_sample_images().images
  return [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), *sample]


class TestPhotos(tfds.core.GeneratorBasedBuilder):
  """Crops of bundled photos: 13 validation and 9 train images, 3 classes."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(num_classes=3),
        }),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'validation': self._generate_examples(VALIDATION_SHAPES),
            'train': self._generate_examples(VALIDATION_SHAPES[:9])}

  def _generate_examples(self, shapes):
    photos = _photos()
    for i, (height, width) in enumerate(shapes):
      photo = photos[i % len(photos)]
      top, left = (7 * i) % (photo.shape[0] - height), (11 * i) % (photo.shape[1] - width)
      yield i, {'image': photo[top:top + height, left:left + width], 'label': i % 3}
