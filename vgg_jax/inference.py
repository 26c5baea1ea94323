"""Trained and imported nets in a notebook: load, transform, features, predict.

  model, variables, transform = vgg_jax.load('workdirs/vgg16')    # a workdir or a convert DIR
  x = transform(photos)                        # uint8 RGB -> the net's input (Q, centre crop)
  feats = vgg_jax.features(model, variables, x, layers=('conv5_3', 'fc7'))
  top5 = vgg_jax.predict(model, variables, photo, transform,
                         class_names=vgg_jax.class_names('workdirs/vgg16'))
  d = vgg_jax.descriptors(model, variables, photos, transform)  # Appendix B, (N, 4096)

No tensorflow: images are numpy or jax arrays.
"""

import dataclasses
import functools
import weakref
from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import checkpoints
from vgg_jax import evaluation
from vgg_jax import models
from vgg_jax import ops
from vgg_jax import preprocess
from vgg_jax import protocol
from vgg_jax import run_files
from vgg_jax import winograd

Images = Union[np.ndarray, jax.Array, Sequence[np.ndarray]]


def as_rgb(image) -> np.ndarray:
  """A uint8 image as the training pipeline reads it, (H, W, 3) RGB: grey, (H, W) or
  (H, W, 1), repeated to RGB (`tf.io.decode_image(..., channels=3)`); an alpha channel, grey
  or RGB + alpha, composited on white (what image_folder's preparation does with PIL:
  round((pixel * alpha + 255 * (255 - alpha)) / 255))."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f'Expected an image (H, W) or (H, W, C) with C = 1 (grey), 2 (grey and '
                     f'alpha), 3 (RGB) or 4 (RGBA); got shape {image.shape}.')
  if image.shape[-1] in (2, 4):
    alpha = image[..., -1:].astype(np.float64)
    image = np.round((image[..., :-1] * alpha + 255 * (255 - alpha)) / 255).astype(np.uint8)
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


@dataclasses.dataclass(frozen=True)
class InputTransform:
  """What a net needs done to a photo: rescale to Q, crop, normalise (Sec. 3.2, Sec. 2.1).

  Attributes:
    normalization: the input normalisation the weights were trained with (imported weights
      bring their own: torchvision's std, Caffe's BGR).
    image_size: the training crop; fc6 sees (image_size / 32)^2 conv5 cells.
    scale: Q, the smallest image side after the isotropic rescale.
    dtype: the net's compute dtype.
    test_scales: the multi-scale Q the net is tested at (Sec. 3.2), which `descriptors` use
      (Appendix B); (): Q alone.
  """
  normalization: preprocess.Normalization
  image_size: int
  scale: int
  dtype: str = 'float32'
  test_scales: tuple[int, ...] = ()

  def rescale(self, image) -> np.ndarray:
    """One image (`as_rgb`'s kinds) as RGB, rescaled isotropically so its smallest side is
    Q, uint8 (bilinear, antialiased when shrinking, as the input pipeline does)."""
    image = as_rgb(image)
    shape = (*protocol.rescaled_shape(*image.shape[:2], self.scale), 3)
    if shape == image.shape:
      return image.astype(np.uint8)
    resized = jax.image.resize(jnp.asarray(image, jnp.float32), shape, 'linear', antialias=True)
    return np.asarray(jnp.clip(jnp.round(resized), 0, 255), np.uint8)

  def crop(self, image: np.ndarray) -> np.ndarray:
    """The central image_size x image_size crop (single-crop testing, Sec. 3.2)."""
    top = (image.shape[0] - self.image_size) // 2
    left = (image.shape[1] - self.image_size) // 2
    return image[top:top + self.image_size, left:left + self.image_size]

  def __call__(self, images: Images) -> jax.Array:
    """uint8 images, (N, H, W, C), one (H, W[, C]), or a list of any sizes (`as_rgb`'s
    kinds) -> the net's input (N, image_size, image_size, 3): each rescaled to Q,
    centre-cropped, normalised."""
    batch = np.stack([self.crop(self.rescale(image)) for image in _as_list(images)])
    return self.normalization(jnp.asarray(batch), models.DTYPES[self.dtype])



def load(path: str, step: Optional[int] = None) -> tuple[models.VGG, dict, InputTransform]:
  """(model, variables, transform) of a training workdir or a `vgg_jax.convert` output: the
  newest checkpoint (or `step`), the net its config describes, its input normalisation."""
  config = checkpoints.load_config(path, step)
  model = models.create_model(config)
  # jax arrays, not numpy's: immutable, so their Winograd kernels are made once
  # (`_with_transformed_kernels`).
  params = jax.tree.map(jnp.asarray, jax.device_get(checkpoints.restore_params(path, config,
                                                                               step)))
  transform = InputTransform(preprocess.Normalization.from_config(config), config.image_size,
                             protocol.single_test_scale(config), config.dtype,
                             protocol.test_scales(config))
  return model, {'params': params}, transform


class _TransformedKernels:
  """The Winograd kernels (`winograd.transformed_kernels`) of the parameters seen, made once
  per parameters and kept while they live: the notebook functions apply fixed weights call
  after call. jax arrays are immutable, so the kernels' identities (checked through weak
  references) say the weights are the same; numpy parameters, which can change in place, get
  none and keep the transform in the net."""

  def __init__(self):
    self._entries = {}

  def __call__(self, model: models.VGG, params: dict) -> dict:
    kernels = [leaf for leaf in jax.tree.leaves(params) if leaf.ndim == 4]
    if not kernels or not all(isinstance(k, jax.Array) for k in kernels):
      return {}
    key = (id(kernels[0]), model.conv_algorithm, model.dtype)
    refs, transformed = self._entries.get(key, ((), {}))
    if len(refs) != len(kernels) or any(ref() is not k for ref, k in zip(refs, kernels)):
      forget = lambda _, entries=self._entries: entries.pop(key, None)
      refs = tuple(weakref.ref(k, forget if i == 0 else None) for i, k in enumerate(kernels))
      transformed = winograd.transformed_kernels(params, model.conv_algorithm, model.dtype)
      self._entries[key] = refs, transformed
    return transformed


_transformed_kernels = _TransformedKernels()


def _with_transformed_kernels(model: models.VGG, variables: dict) -> dict:
  transformed = _transformed_kernels(model, variables['params'])
  return {**variables, models.WINOGRAD: transformed} if transformed else variables


def class_names(path: str) -> Optional[list[str]]:
  """The class names of the net in `path` (a workdir or convert output), in label order."""
  return run_files.class_names(path)


def _feature_names(variant: str) -> list[str]:
  convs = [name for name in models.layer_names(variant) if name.startswith('conv')]
  pools = [f'pool{b}' for b in range(1, len(models.VGG_SPECS[variant]) + 1)]
  return convs + pools + ['fc6', 'fc7', 'fc8']


def features(model: models.VGG, variables: dict, images: jax.Array,
             layers: Sequence[str] = ('conv5_3', 'fc7'), dense: bool = False) -> dict:
  """The activations of the named layers for net inputs `images` (see `InputTransform`).

  Names are the paper's: conv1_1 ... conv5_4 and fc6, fc7 after their ReLU (fc7's are the
  4096-d image features of transfer-learning papers), pool1 ... pool5 after each max-pool, and
  fc8, the class scores. With `dense`, fc6 ... fc8 are maps over a larger image (Sec. 3.2).
  """
  known = _feature_names(model.variant)
  unknown = [name for name in layers if name not in known]
  if unknown:
    raise ValueError(f'No layer {", ".join(unknown)} in net {model.variant}; its layers are '
                     f'{", ".join(known)}.')
  computed = _features(model, _with_transformed_kernels(model, variables), images,
                       tuple(layers), dense)
  return {name: computed[name] for name in layers}


@functools.partial(jax.jit, static_argnames=('model', 'layers', 'dense'))
def _features(model, variables, images, layers, dense):
  last_conv = {f'pool{b}': f'conv{b}_{len([s for s in block if s != models.LRN])}'
               for b, block in enumerate(models.VGG_SPECS[model.variant], start=1)}
  modules = {last_conv.get(name, name) for name in layers}
  _, state = model.apply(variables, images, dense=dense,
                         capture_intermediates=lambda m, method: (method == '__call__'
                                                                  and m.name in modules),
                         mutable=['intermediates'])
  # Captured are the layers' outputs before their ReLU; the ReLU and pools are applied here.
  captured = {name: value['__call__'][0] for name, value in state['intermediates'].items()}
  result = {}
  for name in layers:
    if name == 'fc8':
      result[name] = captured[name].astype(jnp.float32)
    elif name.startswith('pool'):
      result[name] = ops.max_pool_2x2(nn.relu(captured[last_conv[name]]))
    else:
      result[name] = nn.relu(captured[name])
  return result


_dense_posteriors = jax.jit(evaluation.dense_posteriors,
                            static_argnames=('model', 'normalization', 'flip'))
_dense_descriptors = jax.jit(evaluation.dense_descriptors,
                             static_argnames=('model', 'normalization', 'flip', 'layer'))


def _as_list(images: Images) -> list:
  """One image ((H, W) or (H, W, C)) or several ((N, H, W, C) or a list) as a list."""
  if not isinstance(images, (list, tuple)) and np.ndim(images) in (2, 3):
    return [images]
  return list(images)


def _padded(image: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """One rescaled image zero-padded to multiples of 32, and its (height, width), batched."""
  step = models.DOWNSAMPLING
  height, width = image.shape[:2]
  padded = np.zeros((1, protocol.round_up(height, step), protocol.round_up(width, step), 3),
                    np.uint8)
  padded[0, :height, :width] = image
  return jnp.asarray(padded), jnp.asarray([[height, width]])


def predict(model: models.VGG, variables: dict, images: Images, transform: InputTransform,
            k: int = 5, class_names: Optional[Sequence[str]] = None,
            flip: bool = False) -> list[list[dict]]:
  """Top-k classes of each image, any size: rescaled to Q and scored densely, the class
  score map averaged over the image (Sec. 3.2); `flip` averages in the mirrored image.

  Returns, per image, k dicts {'label', 'name' (when `class_names`), 'probability'}, most
  probable first.
  """
  results = []
  transformed = _transformed_kernels(model, variables['params'])
  for image in _as_list(images):
    probs = _dense_posteriors(variables['params'], *_padded(transform.rescale(image)),
                              model=model, normalization=transform.normalization, flip=flip,
                              transformed=transformed)[0]
    top = np.argsort(-np.asarray(probs), kind='stable')[:k]
    results.append([{'label': int(i), **({'name': class_names[i]} if class_names else {}),
                     'probability': float(probs[i])} for i in top])
  return results


def descriptors(model: models.VGG, variables: dict, images: Images, transform: InputTransform,
                scales: Optional[Sequence[int]] = None, aggregate: str = 'average',
                layer: str = 'fc7', flip: bool = True) -> np.ndarray:
  """Appendix B's image descriptors, (N, 4096 at full width; x len(scales) when stacked).

  Each image, any size, is rescaled to each Q in `scales` (default: the net's test scales,
  `transform.test_scales`, which are Appendix B's {256, 384, 512} for the paper's nets
  trained at S in [256, 512]), the net applied densely, `layer`'s
  output (after its ReLU) averaged over the locations and, with `flip`, over the image and its
  mirror; the scales' descriptors are averaged or stacked, then L2-normalised. A linear
  classifier on these recognises classes the net was not trained on (`vgg_jax.linear_probe`).
  """
  per_scale = []
  transformed = _transformed_kernels(model, variables['params'])
  for q in scales or transform.test_scales or (transform.scale,):
    at_q = dataclasses.replace(transform, scale=int(q))
    per_scale.append(np.concatenate([
        np.asarray(_dense_descriptors(variables['params'], *_padded(at_q.rescale(image)),
                                      model=model, normalization=transform.normalization,
                                      flip=flip, layer=layer, transformed=transformed))
        for image in _as_list(images)]))
  return evaluation.aggregate_descriptors(per_scale, aggregate)
