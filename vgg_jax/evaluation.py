"""The paper's test protocol (Sec. 3.2): dense and multi-crop evaluation, several scales, fusion.

A test image is rescaled so its smallest side is Q, then scored two ways:

- dense: the net runs fully-convolutionally on the whole image (`VGG(..., dense=True)`), the
  class score map is averaged over its locations, and the soft-max of the image and of its
  horizontal flip are averaged;
- multi-crop: a 5 x 5 regular grid of training-size crops spanning the image, each also
  flipped, 50 soft-max outputs averaged.

The flips follow `config.test_flip` (the paper's True; off for nets trained without flips,
such as the digits, where a mirrored image is another symbol).

Posteriors are averaged over the test scales Q (Table 4), over the two methods
(dense+multicrop, Table 5) and over several nets (fusion, Table 6). Each pass yields one
posterior per example of this process's part of the split, in split order, so any of them
can be averaged with any other; top-1/top-5 errors are exact counts summed over processes.

Each process feeds the steps its own images, one slice per local device, at its own pace: a
step has no collective, so the varying image shapes of dense evaluation never have to line up
across hosts. No tensorflow here: the batches come from `input_pipeline.test_batches`.
"""

import dataclasses
import functools
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from vgg_jax import models
from vgg_jax import preprocess
from vgg_jax import progress as progress_lib
from vgg_jax import protocol
from vgg_jax import steps

# How Appendix B's descriptors of several scales make one (`aggregate_descriptors`).
DESCRIPTOR_AGGREGATES = ('average', 'stack')
# How often a long pass logs its progress.
LOG_EVERY_SECONDS = 30.0


# ---------------------------------------------------------------------------------------------
# Device side: one batch of images -> one posterior per image.


def _flip_valid(images: jax.Array, widths: jax.Array) -> jax.Array:
  """Horizontal flip of each image's valid (unpadded) columns; padding stays on the right."""
  columns = jnp.arange(images.shape[2])
  index = jnp.where(columns[None] < widths[:, None], widths[:, None] - 1 - columns[None],
                    columns[None])
  return jnp.take_along_axis(images, index[:, None, :, None], axis=2)


def _dense_views(images, sizes, normalization, dtype, flip):
  """Normalised images, followed by their mirrors when `flip`; (inputs, sizes, views)."""
  x = preprocess.normalize(images, normalization, dtype)
  if not flip:
    return x, sizes, 1
  return (jnp.concatenate([x, _flip_valid(x, sizes[:, 1])]),
          jnp.concatenate([sizes, sizes]), 2)


def _variables(params, transformed: Optional[dict]) -> dict:
  return {'params': params, **({models.WINOGRAD: transformed} if transformed else {})}


def dense_posteriors(params, images: jax.Array, sizes: jax.Array, *, model: models.VGG,
                     normalization: preprocess.Normalization, flip: bool = True,
                     transformed: Optional[dict] = None) -> jax.Array:
  """Sec. 3.2 dense evaluation of a batch of padded images: (B, H, W, 3) uint8 whose valid
  part is sizes[i] = (height, width) -> (B, num_classes) soft-max posteriors.

  The net masks the padding out of every feature map (`VGG(..., sizes=...)`), so each image
  scores exactly as it would alone; the score map is averaged over the locations whose
  window lies inside the image. `transformed`: the params' Winograd kernels, made once for
  fixed weights (`winograd.transformed_kernels`).
  """
  x, sizes, views = _dense_views(images, sizes, normalization, model.dtype, flip)
  scores = model.apply(_variables(params, transformed), x, dense=True, sizes=sizes)
  mean_scores = _mean_over_windows(scores, images.shape[1], sizes)
  return jax.nn.softmax(mean_scores).reshape(views, images.shape[0], -1).mean(axis=0)


def _mean_over_windows(maps: jax.Array, padded_height: int, sizes: jax.Array) -> jax.Array:
  """(B, h, w, C) dense maps -> (B, C), averaged over the locations whose training-size
  window lies inside the image (the rest read padding)."""
  # A value at (r, c) covers grid cells [r, r + g) x [c, c + g) of the conv5 grid.
  grid = padded_height // models.DOWNSAMPLING - maps.shape[1] + 1
  cells = sizes // models.DOWNSAMPLING
  valid_rows = jnp.arange(maps.shape[1])[None] + grid <= cells[:, :1]
  valid_cols = jnp.arange(maps.shape[2])[None] + grid <= cells[:, 1:]
  valid = (valid_rows[:, :, None] & valid_cols[:, None, :]).astype(jnp.float32)[..., None]
  return jnp.sum(maps * valid, axis=(1, 2)) / jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1.0)


def dense_descriptors(params, images: jax.Array, sizes: jax.Array, *, model: models.VGG,
                      normalization: preprocess.Normalization, flip: bool = True,
                      layer: str = 'fc7', transformed: Optional[dict] = None) -> jax.Array:
  """Appendix B's image descriptor at one scale, before normalisation: the net applied densely
  to padded images as in `dense_posteriors`, `layer`'s (fc6 or fc7) output after its ReLU
  averaged over the image's locations and, with `flip`, over the image and its mirror.
  (B, H, W, 3) uint8 -> (B, features) float32."""
  x, sizes, views = _dense_views(images, sizes, normalization, model.dtype, flip)
  _, state = model.apply(_variables(params, transformed), x, dense=True, sizes=sizes,
                         capture_intermediates=lambda m, method: (method == '__call__'
                                                                  and m.name == layer),
                         mutable=['intermediates'])
  maps = jax.nn.relu(state['intermediates'][layer]['__call__'][0].astype(jnp.float32))
  return _mean_over_windows(maps, images.shape[1], sizes).reshape(
      views, images.shape[0], -1).mean(axis=0)


def aggregate_descriptors(per_scale: Sequence[np.ndarray], how: str = 'average') -> np.ndarray:
  """Appendix B: one descriptor per image from its descriptors at several scales Q, averaged
  or stacked (concatenated: the classifier then weighs the scales), then L2-normalised."""
  if how not in DESCRIPTOR_AGGREGATES:
    raise ValueError(f'aggregate={how!r}: expected one of {", ".join(DESCRIPTOR_AGGREGATES)}.')
  joined = (np.mean(per_scale, axis=0) if how == 'average'
            else np.concatenate(per_scale, axis=-1)).astype(np.float32)
  return joined / np.maximum(np.linalg.norm(joined, axis=-1, keepdims=True), 1e-12)


def multicrop_posteriors(params, crops: jax.Array, *, model: models.VGG,
                         normalization: preprocess.Normalization, flip: bool = True) -> jax.Array:
  """Sec. 3.2 multi-crop evaluation: (B, 25, s, s, 3) uint8 crops -> (B, num_classes), the
  mean soft-max over the 25 crops and their 25 flips."""
  batch, num_crops = crops.shape[:2]
  x = preprocess.normalize(crops.reshape(-1, *crops.shape[2:]), normalization, model.dtype)
  views = 2 if flip else 1
  if flip:
    x = jnp.concatenate([x, x[:, :, ::-1]])
  probs = jax.nn.softmax(model.apply({'params': params}, x))
  return probs.reshape(views, batch, num_crops, -1).mean(axis=(0, 2))


@functools.cache
def pmap_posteriors(method: str, model: models.VGG, normalization: preprocess.Normalization,
                    flip: bool = True) -> Callable:
  """The `method` step; each process calls it on batches shaped (local devices, per device, ...).

  Cached, one pmapped function per (method, net, normalization, flip): jax caches compilations
  per function, so a second evaluation of the same net, as during training, compiles nothing.
  `devices` is pmap's default, as jax.pmap asks for the same devices on every process.
  """
  kwargs = dict(model=model, normalization=normalization, flip=flip)
  if method == protocol.DENSE:
    fn = lambda params, batch: dense_posteriors(params, batch['image'], batch['size'], **kwargs)
  else:
    fn = lambda params, batch: multicrop_posteriors(params, batch['crops'], **kwargs)
  return jax.pmap(fn, in_axes=(None, 0))


# ---------------------------------------------------------------------------------------------
# Host side: posteriors of a whole split, errors, protocols.


@dataclasses.dataclass
class Posteriors:
  """Soft-max posteriors of this process's examples, in split order."""
  probs: np.ndarray  # (n, num_classes) float32
  labels: np.ndarray  # (n,) int
  # Wall time per image on this process, timed on batches of already-compiled shapes.
  seconds_per_image: float
  shapes: tuple  # distinct device-batch shapes met (one compilation each)

  def average(self, others: Sequence['Posteriors']) -> 'Posteriors':
    group = [self, *others]
    for other in others:
      if not np.array_equal(other.labels, self.labels):
        raise ValueError('Posteriors of different examples cannot be averaged: the nets or '
                         'passes read different splits.')
    return Posteriors(np.mean([p.probs for p in group], axis=0), self.labels,
                      sum(p.seconds_per_image for p in group),
                      tuple(sorted({s for p in group for s in p.shapes})))


def per_process(num_examples: int) -> int:
  """How many of a split's `num_examples` this process scores at most: its part of
  `tfds.split_for_jax_process`, the split cut into process_count parts."""
  return -(-num_examples // jax.process_count())


def posteriors(p_step: Callable, params, batches: Iterable[dict], name: str = '',
               num_examples: int = 0) -> Posteriors:
  """Runs `p_step` over `batches` ({..., 'label', 'index', 'mask'} shaped (devices, per
  device, ...)) and keeps the posteriors of the unmasked examples, sorted by 'index'."""
  probs, labels, indices, shapes = [], [], [], set()
  progress = progress_lib.Progress(num_examples)
  timed_seconds, timed_images, all_seconds = 0.0, 0, 0.0
  for batch in batches:
    start = time.perf_counter()
    inputs = {k: v for k, v in batch.items() if k in ('image', 'size', 'crops')}
    shape = tuple(tuple(v.shape) for _, v in sorted(inputs.items()))
    out = np.asarray(jax.device_get(p_step(params, inputs)))
    mask = np.asarray(batch['mask']).reshape(-1)
    probs.append(out.reshape(-1, out.shape[-1])[mask])
    labels.append(np.asarray(batch['label']).reshape(-1)[mask])
    indices.append(np.asarray(batch['index']).reshape(-1)[mask])
    seconds = time.perf_counter() - start
    all_seconds += seconds
    if shape in shapes:  # Not the batch that compiled this shape.
      timed_seconds, timed_images = timed_seconds + seconds, timed_images + len(mask)
    shapes.add(shape)
    done = sum(len(i) for i in indices)
    if progress.seconds_since_restart() >= LOG_EVERY_SECONDS or done >= num_examples:
      img_per_s, eta = progress.rate(done)
      logging.info('%s: %d/%d images, %s img/s, ETA %s', name, done, num_examples,
                   progress_lib.rate(img_per_s), progress_lib.duration(eta))
  indices = np.concatenate(indices)
  order = np.argsort(indices, kind='stable')
  if not np.array_equal(indices[order], np.arange(len(indices))):
    raise RuntimeError(f'{name}: examples were dropped or repeated.')
  per_image = (timed_seconds / timed_images if timed_images
               else all_seconds / max(len(indices), 1))
  return Posteriors(np.concatenate(probs)[order], np.concatenate(labels)[order], per_image,
                    tuple(sorted(shapes)))


def error_rates(post: Posteriors) -> dict:
  """Exact top-1 / top-5 error over every example of every process, counted as training
  counts them (`steps.topk_correct`: ties count against the label, NaNs are never right)."""
  k = min(5, post.probs.shape[1])
  correct = [np.sum(steps.topk_correct(post.probs, post.labels, top)) for top in (1, k)]
  counts = np.array([len(post.labels), *correct], np.int64)
  totals = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 3).sum(axis=0)
  total, top1, top5 = (int(t) for t in totals)
  return {'top1_error': 1.0 - top1 / total, 'top5_error': 1.0 - top5 / total,
          'num_examples': total}


def run(params, config, protocols: Sequence[str], batches: Callable[[str, int], Iterator],
        num_examples: int, scales: Optional[Sequence[int]] = None,
        single: Optional[int] = None) -> tuple[dict, dict[str, Posteriors]]:
  """Evaluates `params` with each protocol; each (method, Q) pass runs once and is shared.

  `batches(method, q)` yields this process's batches for a pass. Returns (results, posteriors)
  keyed by protocol; results hold top1_error, top5_error, num_examples, scales,
  crops_per_image, img_per_s and compilations (distinct batch shapes, one compile each).
  """
  scales = tuple(scales) if scales else protocol.test_scales(config)
  single = single or protocol.single_test_scale(config)
  protocol.check_scales((*scales, single), config.image_size)
  model = models.create_model(config)
  normalization = preprocess.Normalization.from_config(config)
  passes = protocol.protocol_passes(protocols, single, scales)
  computed = {}
  for method, q in dict.fromkeys(p for ps in passes.values() for p in ps):
    step = pmap_posteriors(method, model, normalization, flip=config.test_flip)
    computed[method, q] = posteriors(step, params, batches(method, q), f'{method} Q={q}',
                                     num_examples)
  results, combined = {}, {}
  for name, needed in passes.items():
    post = computed[needed[0]].average([computed[p] for p in needed[1:]])
    results[name] = {
        **error_rates(post),
        'scales': sorted({q for _, q in needed}),
        'crops_per_image': protocol.views_per_image(needed, config.test_flip),
        'img_per_s': jax.process_count() / max(post.seconds_per_image, 1e-12),
        'compilations': len(post.shapes),
    }
    combined[name] = post
    logging.info('%s (Q = %s): top-1 error %.2f%%, top-5 error %.2f%% over %d images.',
                 name, ', '.join(map(str, results[name]['scales'])),
                 100 * results[name]['top1_error'], 100 * results[name]['top5_error'],
                 results[name]['num_examples'])
  return results, combined


def fuse(members: Sequence[dict[str, Posteriors]]) -> dict[str, Posteriors]:
  """Sec. 4.4 / Table 6: the soft-max posteriors of several nets averaged, per protocol."""
  return {name: members[0][name].average([m[name] for m in members[1:]])
          for name in members[0]}
