"""scikit-learn's handwritten digits as a tfds dataset: real images with no download.

The 1,797 8x8 grey-level digits (UCI optdigits, shipped inside scikit-learn) are upsampled to
32x32 RGB PNGs, the smallest size a VGG takes (five 2x2 max-pools), and split 80/20 with every
class kept in proportion. Built once into the tfds data_dir, then read like any tfds dataset,
so the default run exercises the same tfds -> tf.data path as ImageNet.
"""

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def _upsample(digit: np.ndarray) -> np.ndarray:
  """One 8x8 digit with values 0-16 -> IMAGE_SIZE^2 x 3 uint8, bilinear."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grey = Image.fromarray(np.round(digit * (255 / 16)).astype(np.uint8))
  grey = grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
  return np.repeat(np.asarray(grey)[..., None], 3, axis=-1)


def split_indices(targets: np.ndarray) -> dict[str, np.ndarray]:
  """{'train', 'test'}: sorted indices of the stratified 80/20 split of the 1,797 digits."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  train, test = model_selection.train_test_split(
      np.arange(len(targets)), test_size=TEST_FRACTION, stratify=targets,
      random_state=SPLIT_SEED)
  return {'train': np.sort(train), 'test': np.sort(test)}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits: 1,437 training and 360 test images of 32x32x3, 10 classes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Bilinear 32x32 RGB upsampling, stratified 80/20 split.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is on disk already.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    return {split: self._generate_examples(digits, indices)
            for split, indices in split_indices(digits.target).items()}

  def _generate_examples(self, digits, indices):
    for i in indices:
      yield int(i), {'image': _upsample(digits.images[i]), 'label': int(digits.target[i])}
