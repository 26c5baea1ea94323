"""vgg_jax: the VGG nets of Simonyan & Zisserman (ICLR 2015) in JAX/Flax.

The notebook API (`load`, `features`, `predict`, `descriptors`, `class_names`) is imported on first use, so
`python -m vgg_jax.<module>` starts no faster or slower for it.
"""

import os

# TensorFlow, here only for tf.data, prints C++ INFO notices when imported (the CPU features
# it was built for): keep its warnings and errors. TF_CPP_MIN_LOG_LEVEL=0 shows them. (Its
# oneDNN notice ignores the level; the commands turn oneDNN off, `cli`.)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

_API = ('load', 'features', 'predict', 'descriptors', 'class_names', 'InputTransform')


def __getattr__(name):
  if name in _API:
    from vgg_jax import inference  # pylint: disable=g-import-not-at-top
    return getattr(inference, name)
  raise AttributeError(f'module vgg_jax has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_API))
