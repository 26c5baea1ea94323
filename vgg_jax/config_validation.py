"""Checks a config before anything is read or compiled; each error names the field and value."""

from vgg_jax import default_config
from vgg_jax import errors
from vgg_jax import init_from
from vgg_jax import models
from vgg_jax import ops
from vgg_jax import preprocess
from vgg_jax import protocol
from vgg_jax import steps
from vgg_jax import winograd


def _one_of(config, field: str, choices) -> None:
  if config[field] not in choices:
    raise errors.bad_field(field, config[field], f'expected one of {", ".join(choices)}.')


def check_random_access_dir(config) -> None:
  """config.random_access_dir must be a path ArrayRecord can open (None: the default)."""
  directory = config.random_access_dir
  if directory is not None and not default_config.is_local_path(directory):
    raise errors.bad_field('random_access_dir', directory, 'ArrayRecord reads and writes local '
                           'files only: use a local directory, or one every host mounts (e.g. '
                           'NFS).')


def validate(config, num_devices: int) -> None:
  """Raises ConfigError for the first problem found in `config` (global `num_devices`)."""
  fail = lambda field, why: errors.bad_field(field, config[field], why)
  _one_of(config, 'variant', models.VARIANTS)
  _one_of(config, 'init', models.INITS)
  _one_of(config, 'dtype', models.DTYPES)
  _one_of(config, 'conv_algorithm', winograd.CONV_ALGORITHMS)
  if config.conv_algorithm == 'winograd':
    try:
      winograd.uses_winograd(config.conv_algorithm, (1, 32, 32, 16), (3, 3, 16, 16),
                             models.DTYPES[config.dtype])
    except (ValueError, RuntimeError) as e:
      raise errors.ConfigError(str(e).replace('conv_algorithm=', 'config.conv_algorithm=', 1))
  _one_of(config, 'weight_grad', ops.WEIGHT_GRADS)
  if not config.width > 0:
    raise fail('width', 'must be positive (1.0 is the paper\'s net).')
  if not 0 <= config.dropout_rate < 1:
    raise fail('dropout_rate', 'must be in [0, 1).')
  for field in ('mean_rgb', 'std_rgb'):
    values = config[field]
    if len(values) != 3 or (field == 'std_rgb' and not all(v > 0 for v in values)):
      raise fail(field, 'expected three values (R, G, B) in 0-255 units'
                 + (', each positive.' if field == 'std_rgb' else '.'))
  _one_of(config, 'channel_order', preprocess.CHANNEL_ORDERS)
  check_random_access_dir(config)
  smin, _ = protocol.scale_bounds(config.train_scale)
  size = config.image_size
  if size <= 0 or size % models.DOWNSAMPLING:
    raise fail('image_size', f'must be a positive multiple of {models.DOWNSAMPLING} (five 2x2 '
               'max-pools), e.g. 224.')
  if size > smin:
    raise fail('image_size', f'is larger than the smallest training scale S={smin}: a '
               f'{size}x{size} crop does not fit; raise train_scale or lower image_size.')
  if config.eval_scale is not None and config.eval_scale < size:
    raise fail('eval_scale', f'is smaller than image_size={size}.')
  for q in config.test_scales:
    if isinstance(q, bool) or not isinstance(q, int) or q < size:
      raise fail('test_scales', f'each Q must be an int >= image_size={size}.')
  if config.dense_size_step <= 0:
    raise fail('dense_size_step', 'must be positive, e.g. 64.')
  if config.dense_max_aspect < 1:
    raise fail('dense_max_aspect', 'must be >= 1 (long side / short side).')
  if config.eval_protocols:
    protocol.parse_protocols(config.eval_protocols, name='config.eval_protocols')
  for field in ('batch_size', 'eval_batch_size', 'dense_batch_size', 'multicrop_batch_size'):
    batch = config[field]
    if batch <= 0 or batch % num_devices:
      raise fail(field, f'must be a positive multiple of the {num_devices} devices (e.g. '
                 f'{num_devices * max(1, batch // num_devices)}).')
  _one_of(config, 'init_mode', init_from.MODES)
  frozen = steps.frozen_prefixes(config)
  layers = models.layer_names(config.variant)
  for prefix in frozen:
    if not any(steps.is_frozen(layer, (prefix,)) for layer in layers):
      raise fail('frozen_layers', f'{prefix!r} names no layer of net {config.variant} '
                 f'({", ".join(layers)}); give name prefixes, e.g. conv or conv1,conv2.')
  if frozen and all(steps.is_frozen(layer, frozen) for layer in layers):
    raise fail('frozen_layers', 'freezes every layer: nothing would train.')
  accum = config.grad_accum_steps
  if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
    raise fail('grad_accum_steps', 'must be an int >= 1.')
  if (config.batch_size // num_devices) % accum:
    raise fail('grad_accum_steps', f'batch_size={config.batch_size} over {num_devices} devices '
               f'is {config.batch_size // num_devices} per device, which does not split into '
               f'{accum} equal micro-batches.')
  if not config.learning_rate > 0:
    raise fail('learning_rate', 'must be positive.')
  if not 0 <= config.momentum < 1:
    raise fail('momentum', 'must be in [0, 1).')
  _one_of(config, 'sgd_form', steps.SGD_FORMS)
  if config.weight_decay < 0:
    raise fail('weight_decay', 'must be >= 0.')
  if not 0 < config.lr_plateau_factor < 1:
    raise fail('lr_plateau_factor', 'must be in (0, 1).')
  if config.num_train_steps <= 0 and not config.num_epochs > 0:
    raise fail('num_epochs', 'must be positive when num_train_steps <= 0.')
  for field in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    if config[field] <= 0:
      raise fail(field, 'must be positive.')
