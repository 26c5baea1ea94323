"""tfds builders that ship with vgg_jax; importing this package registers them with tfds."""

from vgg_jax.datasets.scaled_digits import ScaledDigits
from vgg_jax.datasets.sklearn_digits import SklearnDigits
