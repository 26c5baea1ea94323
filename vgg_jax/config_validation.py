"""Checks a config before anything is read or compiled; each error names the field and value."""

from vgg_jax import errors
from vgg_jax import init_from
from vgg_jax import models
from vgg_jax import ops
from vgg_jax import preprocess
from vgg_jax import protocol
from vgg_jax import steps
from vgg_jax import winograd


def _fail(field: str, value, why: str):
  raise errors.ConfigError(f'config.{field}={value!r}: {why}')


def validate(config, num_devices: int) -> None:
  """Raises ConfigError for the first problem found in `config` (global `num_devices`)."""
  if config.variant not in models.VARIANTS:
    _fail('variant', config.variant, f'expected one of {", ".join(models.VARIANTS)}.')
  if config.init not in models.INITS:
    _fail('init', config.init, f'expected one of {", ".join(models.INITS)}.')
  if config.dtype not in models.DTYPES:
    _fail('dtype', config.dtype, f'expected one of {", ".join(models.DTYPES)}.')
  algorithm = config.conv_algorithm
  if algorithm not in winograd.CONV_ALGORITHMS:
    _fail('conv_algorithm', algorithm, f'expected one of {", ".join(winograd.CONV_ALGORITHMS)}.')
  if algorithm == 'winograd':
    try:
      winograd.uses_winograd(algorithm, (1, 32, 32, 16), (3, 3, 16, 16),
                             models.DTYPES[config.dtype])
    except (ValueError, RuntimeError) as e:
      raise errors.ConfigError(str(e).replace('conv_algorithm=', 'config.conv_algorithm=', 1))
  if config.weight_grad not in ops.WEIGHT_GRADS:
    _fail('weight_grad', config.weight_grad, f'expected one of {", ".join(ops.WEIGHT_GRADS)}.')
  if not config.width > 0:
    _fail('width', config.width, 'must be positive (1.0 is the paper\'s net).')
  if not 0 <= config.dropout_rate < 1:
    _fail('dropout_rate', config.dropout_rate, 'must be in [0, 1).')
  for field in ('mean_rgb', 'std_rgb'):
    values = config[field]
    if len(values) != 3 or (field == 'std_rgb' and not all(v > 0 for v in values)):
      _fail(field, values, 'expected three values (R, G, B) in 0-255 units'
            + (', each positive.' if field == 'std_rgb' else '.'))
  if config.channel_order not in preprocess.CHANNEL_ORDERS:
    _fail('channel_order', config.channel_order,
          f'expected one of {", ".join(preprocess.CHANNEL_ORDERS)}.')
  smin, _ = protocol.scale_bounds(config.train_scale)
  size = config.image_size
  if size <= 0 or size % models.DOWNSAMPLING:
    _fail('image_size', size, f'must be a positive multiple of {models.DOWNSAMPLING} '
          '(five 2x2 max-pools), e.g. 224.')
  if size > smin:
    _fail('image_size', size, f'is larger than the smallest training scale S={smin}: a '
          f'{size}x{size} crop does not fit; raise train_scale or lower image_size.')
  if config.eval_scale is not None and config.eval_scale < size:
    _fail('eval_scale', config.eval_scale, f'is smaller than image_size={size}.')
  for q in config.test_scales:
    if isinstance(q, bool) or not isinstance(q, int) or q < size:
      _fail('test_scales', config.test_scales, f'each Q must be an int >= image_size={size}.')
  if config.dense_size_step <= 0:
    _fail('dense_size_step', config.dense_size_step, 'must be positive, e.g. 64.')
  if config.dense_max_aspect < 1:
    _fail('dense_max_aspect', config.dense_max_aspect, 'must be >= 1 (long side / short side).')
  if config.eval_protocols:
    protocol.parse_protocols(config.eval_protocols, name='config.eval_protocols')
  for field in ('batch_size', 'eval_batch_size', 'dense_batch_size', 'multicrop_batch_size'):
    batch = config[field]
    if batch <= 0 or batch % num_devices:
      _fail(field, batch, f'must be a positive multiple of the {num_devices} devices '
            f'(e.g. {num_devices * max(1, batch // num_devices)}).')
  if config.init_mode not in init_from.MODES:
    _fail('init_mode', config.init_mode, f'expected one of {", ".join(init_from.MODES)}.')
  frozen = steps.frozen_prefixes(config)
  layers = models.layer_names(config.variant)
  for prefix in frozen:
    if not any(steps.is_frozen(layer, (prefix,)) for layer in layers):
      _fail('frozen_layers', config.frozen_layers, f'{prefix!r} names no layer of net '
            f'{config.variant} ({", ".join(layers)}); give name prefixes, e.g. conv or '
            'conv1,conv2.')
  if frozen and all(steps.is_frozen(layer, frozen) for layer in layers):
    _fail('frozen_layers', config.frozen_layers, 'freezes every layer: nothing would train.')
  accum = config.grad_accum_steps
  if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
    _fail('grad_accum_steps', accum, 'must be an int >= 1.')
  if (config.batch_size // num_devices) % accum:
    _fail('grad_accum_steps', accum, f'batch_size={config.batch_size} over {num_devices} '
          f'devices is {config.batch_size // num_devices} per device, which does not split '
          f'into {accum} equal micro-batches.')
  if not config.learning_rate > 0:
    _fail('learning_rate', config.learning_rate, 'must be positive.')
  if not 0 <= config.momentum < 1:
    _fail('momentum', config.momentum, 'must be in [0, 1).')
  if config.sgd_form not in steps.SGD_FORMS:
    _fail('sgd_form', config.sgd_form, f'expected one of {", ".join(steps.SGD_FORMS)}.')
  if config.weight_decay < 0:
    _fail('weight_decay', config.weight_decay, 'must be >= 0.')
  if not 0 < config.lr_plateau_factor < 1:
    _fail('lr_plateau_factor', config.lr_plateau_factor, 'must be in (0, 1).')
  if config.num_train_steps <= 0 and not config.num_epochs > 0:
    _fail('num_epochs', config.num_epochs, 'must be positive when num_train_steps <= 0.')
  for field in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    if config[field] <= 0:
      _fail(field, config[field], 'must be positive.')
