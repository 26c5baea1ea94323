"""Training state, optimiser and the pure train / eval steps (Sec. 3.1, 3.3).

The steps are written for one device's share of a batch and reduce over the mapped axis
`AXIS`: gradients are averaged with `lax.pmean`, so a step on D devices is exactly a step on
one device with the whole batch, the paper's synchronous multi-GPU scheme (Sec. 3.3).
`pmap_train_step` and `pmap_eval_step` map them over the local devices. No tensorflow here: this module runs on
accelerator images that lack it.
"""

import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax import lax

from vgg_jax import models
from vgg_jax import preprocess

AXIS = 'batch'
# Where the learning rate enters momentum SGD (`create_optimizer`).
SGD_FORMS = ('caffe', 'pytorch')


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the learning-rate plateau tracker (Sec. 3.1).

  `plateau` is optax's `reduce_on_plateau` state; `plateau.scale` multiplies the learning rate
  and is advanced only by validation results (`plateau_update`). `nonfinite_steps` counts the
  steps whose loss or gradients were not finite, none of which changed the parameters.
  """
  plateau: Any = None
  nonfinite_steps: Any = 0


def _local_sharding(*spec) -> jax.sharding.NamedSharding:
  """A sharding over the local devices, in pmap's order, along AXIS."""
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def replicated_sharding() -> jax.sharding.NamedSharding:
  """How the pmapped steps hold the state: one full copy on every local device."""
  return _local_sharding()


def batch_sharding() -> jax.sharding.NamedSharding:
  """How the pmapped steps take a batch: leading axis split over the local devices."""
  return _local_sharding(AXIS)


def prefetch_to_device(batches: Iterator, size: int = 2) -> Iterator:
  """Starts copying the next `size` batches to the local devices (`batch_sharding`) while the
  current one runs."""
  sharding = batch_sharding()
  queue = []
  for batch in batches:
    queue.append(jax.device_put(batch, sharding))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


def _decay_mask(params):
  """L2 weight decay applies to weights, not biases, as in the paper's Caffe set-up."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != 'bias', params)


def frozen_prefixes(config) -> tuple[str, ...]:
  """config.frozen_layers ('conv', 'conv1,conv2', 'conv,fc6', ...) as layer-name prefixes."""
  spec = config.frozen_layers
  return tuple(p.strip() for p in spec.split(',') if p.strip())


def is_frozen(layer: str, prefixes: tuple[str, ...]) -> bool:
  return any(layer.startswith(prefix) for prefix in prefixes)


def _layer_labels(params, prefixes):
  return {layer: jax.tree.map(lambda _: 'frozen' if is_frozen(layer, prefixes) else 'trained',
                              value) for layer, value in params.items()}


def scale_by_plateau() -> optax.GradientTransformationExtraArgs:
  """Multiplies the updates by the plateau rule's current scale, passed as `lr_scale` to
  `update` (it lives in `TrainState.plateau`, advanced by validation results, not by steps)."""

  def update(updates, state, params=None, *, lr_scale=1.0, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda u: u * lr_scale, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def create_optimizer(config) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum on the L2-regularised objective (Sec. 3.1), in one of two forms that
  agree while the learning rate is constant and differ when the plateau rule divides it:

  - 'caffe' (the paper's; Caffe's SGDSolver): v <- mu * v - lr * (g + wd * w); w <- w + v.
    The rate scales each gradient before it enters the momentum buffer, so after a drop the
    buffer still carries the steps taken at the old rate, decaying as mu^t.
  - 'pytorch' (torch.optim.SGD, optax.sgd): v <- mu * v + (g + wd * w); w <- w - lr * v.
    The rate scales the whole buffer, so a drop shrinks the accumulated momentum at once.

  `lr` is config.learning_rate times the plateau scale, which `update` takes as `lr_scale`.
  Layers named by config.frozen_layers are left out (optax.multi_transform): they neither
  move nor decay, and hold no momentum.
  """
  decay = optax.add_decayed_weights(config.weight_decay, mask=_decay_mask)
  rate = optax.chain(optax.scale(-config.learning_rate), scale_by_plateau())
  momentum = optax.trace(decay=config.momentum)
  sgd = (optax.chain(decay, rate, momentum) if config.sgd_form == 'caffe'
         else optax.chain(decay, momentum, rate))
  prefixes = frozen_prefixes(config)
  if not prefixes:
    return sgd
  return optax.multi_transform({'trained': sgd, 'frozen': optax.set_to_zero()},
                               functools.partial(_layer_labels, prefixes=prefixes))


def without_frozen(grads, config):
  """Frozen layers' gradients as zeros, so XLA never computes them (nor, below the lowest
  trained layer, the backward pass), and the gradient norm is that of the trained layers."""
  prefixes = frozen_prefixes(config)
  return {layer: jax.tree.map(jnp.zeros_like, g) if is_frozen(layer, prefixes) else g
          for layer, g in grads.items()}


def create_plateau(config) -> optax.GradientTransformationExtraArgs:
  """Divide the learning rate by 1 / lr_plateau_factor when validation error stalls, at most
  lr_max_decreases times (the paper decreased it 3 times, Sec. 3.1)."""
  return optax.contrib.reduce_on_plateau(
      factor=config.lr_plateau_factor, patience=config.lr_plateau_patience,
      min_scale=config.lr_plateau_factor ** config.lr_max_decreases)


def init_params(model: models.VGG, rng: jax.Array, dummy: jax.Array):
  """`model.init`'s parameters, compiled with XLA's backend optimisations off on CPU.

  The initialisers' normal draws go through threefry and erfinv, which XLA's CPU backend is
  slow to optimise for a whole VGG; init runs once, so the unoptimised code costs nothing
  that matters. The draws are the same distribution (values may differ from an
  optimised compilation in the last bit).
  """
  init = jax.jit(lambda r: model.init(r, dummy, train=False)).lower(rng)
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return init.compile(compiler_options=options)(rng)['params']


def create_train_state(config, rng: jax.Array, image_size: int, params=None) -> TrainState:
  """Fresh optimiser state, all float32 (whatever `config.dtype` computes in), for fresh
  parameters or the given ones (a run seeded from another, Sec. 3.1)."""
  model = models.create_model(config)
  if params is None:
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params = init_params(model, rng, dummy)
  state = TrainState.create(apply_fn=model.apply, params=params, tx=create_optimizer(config),
                            plateau=create_plateau(config).init(params))
  # Placed as the pmapped step returns it, so the second step does not compile again.
  state = state.replace(step=jnp.zeros((), jnp.int32), nonfinite_steps=jnp.zeros((), jnp.int32))
  return jax.device_put(state, replicated_sharding())


def plateau_update(state: TrainState, config, validation_error: float) -> TrainState:
  """Feeds one validation top-1 error to the plateau tracker."""
  _, plateau = create_plateau(config).update(
      updates=jnp.zeros(()), state=state.plateau, value=jnp.asarray(validation_error))
  return state.replace(plateau=plateau)


def learning_rate(state: TrainState, config) -> jax.Array:
  return config.learning_rate * state.plateau.scale


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest logits.

  Ties count against the label and a NaN logit is never correct, so a degenerate net cannot
  score well.
  """
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  rank = jnp.sum(logits >= label_logit, axis=-1)
  return ((rank >= 1) & (rank <= k)).astype(jnp.float32)


def classification_metrics(logits, labels) -> dict[str, jax.Array]:
  """Per-example loss and top-1/top-5 errors."""
  k = min(5, logits.shape[-1])
  return {
      'loss': optax.softmax_cross_entropy_with_integer_labels(logits, labels),
      'top1_error': 1.0 - topk_correct(logits, labels, 1),
      'top5_error': 1.0 - topk_correct(logits, labels, k),
  }


def device_rngs(rng: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(colour-shift key, dropout key) for this device and step, from one key shared by all."""
  rng = jax.random.fold_in(jax.random.fold_in(rng, step), lax.axis_index(AXIS))
  color_rng, dropout_rng = jax.random.split(rng)
  return color_rng, dropout_rng


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               config) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on this device's share of the global batch.

  `rng` is the same on every device and step; `device_rngs` folds in both, so the colour shift
  and dropout differ per image, device and step.
  """
  color_rng, dropout_rng = device_rngs(rng, state.step)
  images = preprocess.train_images(batch['image'], color_rng,
                                   preprocess.Normalization.from_config(config),
                                   config.color_shift_std, models.DTYPES[config.dtype])

  def loss_fn(params, images, labels, dropout_rng):
    logits = state.apply_fn({'params': params}, images, train=True,
                            rngs={'dropout': dropout_rng})
    metrics = classification_metrics(logits, labels)
    return jnp.mean(metrics['loss']), metrics

  grad_fn = jax.grad(loss_fn, has_aux=True)
  accum = config.grad_accum_steps
  if accum == 1:
    grads, metrics = grad_fn(state.params, images, batch['label'], dropout_rng)
  else:
    # Sec. 3.3's "batch split into GPU batches", in time rather than over devices: the mean
    # of the micro-batch gradients is the gradient of the whole batch.
    def micro_step(grad_sum, micro):
      images, labels, index = micro
      grads, metrics = grad_fn(state.params, images, labels,
                               jax.random.fold_in(dropout_rng, index))
      return jax.tree.map(jnp.add, grad_sum, grads), metrics

    split = lambda x: x.reshape((accum, -1) + x.shape[1:])
    grad_sum, metrics = lax.scan(
        micro_step, jax.tree.map(jnp.zeros_like, state.params),
        (split(images), split(batch['label']), jnp.arange(accum)))
    grads = jax.tree.map(lambda g: g / accum, grad_sum)
    metrics = jax.tree.map(lambda m: m.reshape(-1), metrics)
  metrics = {name: jnp.mean(value) for name, value in metrics.items()}
  grads = without_frozen(grads, config)
  if lax.axis_size(AXIS) > 1:  # On one device XLA's all-reduce is a copy of every gradient.
    grads, metrics = lax.pmean((grads, metrics), AXIS)
  metrics['grad_norm'] = optax.global_norm(grads)
  # One NaN or inf anywhere must not reach the parameters or the momentum: such a step leaves
  # them as they were, and the host stops the run (or skips on, with skip_nonfinite_steps).
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
  def update(params_and_opt_state):
    params, opt_state = params_and_opt_state
    updates, opt_state = state.tx.update(grads, opt_state, params,
                                         lr_scale=state.plateau.scale)
    return optax.apply_updates(params, updates), opt_state

  # A branch rather than a select per array: the skipped update is not computed, and the
  # kept one needs no copy of the old parameters.
  params, opt_state = lax.cond(finite, update, lambda unchanged: unchanged,
                               (state.params, state.opt_state))
  state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
  metrics['learning_rate'] = learning_rate(state, config)
  metrics['nonfinite'] = (~finite).astype(jnp.float32)
  return state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *,
              config) -> dict[str, jax.Array]:
  """Sums of loss, top-1 and top-5 errors and example counts over the unmasked examples of
  all devices: exact totals, whatever the padding."""
  images = preprocess.normalize(batch['image'], preprocess.Normalization.from_config(config),
                                models.DTYPES[config.dtype])
  logits = state.apply_fn({'params': state.params}, images, train=False)
  metrics = classification_metrics(logits, batch['label'])
  mask = batch['mask'].astype(jnp.float32)
  sums = {name: jnp.sum(value * mask) for name, value in metrics.items()}
  sums['num_examples'] = jnp.sum(mask)
  return lax.psum(sums, AXIS)


def pmap_train_step(config, donate: bool = True) -> Callable:
  """`train_step` over the local devices: state in and out replicated, batch split.

  The state is donated: a VGG's parameters and momentum exceed 1 GB, and without donation the
  old and new copies would both be live.
  """
  return jax.pmap(functools.partial(train_step, config=config), axis_name=AXIS,
                  in_axes=(None, 0, None), out_axes=(None, None),
                  donate_argnums=(0,) if donate else ())


def pmap_eval_step(config) -> Callable:
  return jax.pmap(functools.partial(eval_step, config=config), axis_name=AXIS,
                  in_axes=(None, 0), out_axes=None)
