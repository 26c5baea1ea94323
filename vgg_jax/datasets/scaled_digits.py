"""scikit-learn's digits drawn at random scales and places on a larger, coloured, noisy canvas.

The paper's scale arguments (Sec. 3.1-3.2) assume objects of varying size in images of varying
size; the 8x8 digits of `sklearn_digits` all fill their frame. Here each digit is drawn
(bilinear) into a 64x64 canvas with its side a log-uniform 50-100% of the canvas, at a uniform
position wholly inside it, light (190-255) on dark (0-60) with a slight random tint (+-10 per
channel), plus Gaussian noise (std 6 grey levels). Each of the 1,437 training digits is drawn 4 times and each of the 360 test digits 3
times (the split of `sklearn_digits`, so no test digit is ever trained on): 5,748 training
and 1,080 test images, the same on every machine (each drawing is seeded by digit and copy).

Configs: 'all' (10 classes, the default), '0to4' and '5to9' (those digits only, labelled 0-4),
for Appendix B's transfer to classes a net never saw: `scaled_digits/0to4`.
"""

import numpy as np
import tensorflow_datasets as tfds

from vgg_jax.datasets import sklearn_digits

CANVAS = 64
# Harder settings (30-90% of the canvas, saturated colours, noise 12) left 1/8-width nets at
# chance for 4 epochs; these train in the miniature's 10.
DIGIT_FRACTION = (0.5, 1.0)  # The digit's side, a log-uniform fraction of the canvas.
NOISE_STD = 6.0
COPIES = {'train': 4, 'test': 3}
SEED = 2015


def draw(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One 8x8 digit (values 0-16) -> a CANVAS x CANVAS x 3 uint8 image."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  low, high = np.log(DIGIT_FRACTION)
  side = int(round(CANVAS * np.exp(rng.uniform(low, high))))
  top, left = rng.integers(0, CANVAS - side + 1, size=2)
  ink = Image.fromarray(np.round(digit * (255 / 16)).astype(np.uint8))
  ink = np.asarray(ink.resize((side, side), Image.Resampling.BILINEAR), np.float32) / 255
  alpha = np.zeros((CANVAS, CANVAS, 1), np.float32)
  alpha[top:top + side, left:left + side, 0] = ink
  background = rng.uniform(0, 60) + rng.uniform(-10, 10, size=3)
  foreground = rng.uniform(190, 255) + rng.uniform(-10, 10, size=3)
  image = background + alpha * (foreground - background)
  image += rng.normal(0, NOISE_STD, size=image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


class ScaledDigitsConfig(tfds.core.BuilderConfig):
  """Which digits a config holds, in label order."""

  def __init__(self, *, digits: tuple[int, ...], **kwargs):
    super().__init__(version=tfds.core.Version('1.0.0'), **kwargs)
    self.digits = digits


class ScaledDigits(tfds.core.GeneratorBasedBuilder):
  """Digits at random scales and places on 64x64 canvases: 5,748 train / 1,080 test (all)."""

  BUILDER_CONFIGS = [
      ScaledDigitsConfig(name='all', description='All ten digits.', digits=tuple(range(10))),
      ScaledDigitsConfig(name='0to4', description='Digits 0-4.', digits=(0, 1, 2, 3, 4)),
      ScaledDigitsConfig(name='5to9', description='Digits 5-9, labelled 0-4.',
                         digits=(5, 6, 7, 8, 9)),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(CANVAS, CANVAS, 3)),
            'label': tfds.features.ClassLabel(names=[str(d) for d in self.builder_config.digits]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is on disk already.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    return {split: self._generate_examples(digits, indices, COPIES[split])
            for split, indices in sklearn_digits.split_indices(digits.target).items()}

  def _generate_examples(self, digits, indices, copies):
    label_of = {digit: label for label, digit in enumerate(self.builder_config.digits)}
    for i in indices:
      if int(digits.target[i]) not in label_of:
        continue
      for copy in range(copies):
        rng = np.random.default_rng((SEED, int(i), copy))
        yield int(i) * 10 + copy, {'image': draw(digits.images[i], rng),
                                   'label': label_of[int(digits.target[i])]}
