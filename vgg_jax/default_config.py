"""Every field of a vgg_jax experiment, once, at the paper's ImageNet settings (Sec. 3.1).

Other experiment files start from `get_config()` here and override only what differs.
"""

import os
from typing import Optional

import ml_collections
from ml_collections import config_dict

# The training scales of Table 3, by sweep argument: `--config=experiments/configD.py:S=384`.
TRAINING_SCALES = {'S=256': 256, 'S=384': 384, 'S=256-512': (256, 512)}
# What a checkpoint written before one of these fields existed was trained with, where that is
# not today's default (`from_saved`); a missing field not listed here means today's default.
# conv_algorithm and weight_grad are absent on purpose: they change how, not what, is computed.
BEFORE_THE_FIELD = {
    'sgd_form': 'pytorch',  # The momentum buffer held unscaled gradients (optax.sgd's form).
    'decode_crop': False,  # JPEGs were decoded whole, then rescaled and cropped.
}


def dataset_name(dataset: str) -> str:
  """The tfds name in config.dataset ('NAME[/CONFIG][:VERSION]'), e.g. 'imagenet2012'."""
  return dataset.split(':')[0].split('/')[0]


def is_local_path(path: str) -> bool:
  """Whether `path` is a file system path rather than a URL (gs://...): ArrayRecord opens
  only those."""
  return '://' not in os.fspath(path)


def set_training_scale(config: ml_collections.ConfigDict, arg: Optional[str]) -> None:
  """Applies a config-file argument 'S=256', 'S=384' or 'S=256-512' (Table 3's columns)."""
  if arg is None:
    return
  if arg not in TRAINING_SCALES:
    raise ValueError(f'Config argument {arg!r}: expected one of {", ".join(TRAINING_SCALES)}, '
                     'e.g. --config=experiments/configD.py:S=384.')
  config.train_scale = TRAINING_SCALES[arg]


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A config saved beside a checkpoint (JSON, so its tuples are lists) over today's defaults:
  what the evaluation, inference and seeding of an older checkpoint read, field by field, with
  BEFORE_THE_FIELD for the fields it predates."""
  config = get_config()
  config.update(BEFORE_THE_FIELD)
  config.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
  return config


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Model (Table 1).
  config.variant = 'A'  # 'A', 'A-LRN', 'B', 'C', 'D' or 'E'.
  config.num_classes = 1000  # fc8's width; must match the dataset's classes.
  config.width = 1.0  # Channel multiplier of every layer (fc6, fc7 too); 1.0: the paper's.
  config.dtype = 'float32'  # Compute dtype ('bfloat16', 'float16' too); parameters: float32.
  config.dropout_rate = 0.5  # After fc6 and after fc7.
  config.init = 'paper'  # 'paper': N(0, init_std^2), biases 0; or 'glorot'.
  # The paper's "variance 1e-2" read as Caffe and torchvision read it: std 0.01 (std 0.1
  # makes a ReLU VGG's signal grow ~5x per layer).
  config.init_std = 0.01
  # A narrower net or a smaller crop has smaller fan-ins, so the same std shrinks the signal
  # less than in the paper's net. True: each layer's std is init_std * sqrt(its fan-in in the
  # full-size net (width 1, 224 crop) / its fan-in here), so each layer scales the signal as
  # the paper's does (the miniatures of docs/reproduction.md).
  config.init_std_as_full_size = False
  # How the 3x3 convolutions are computed: 'xla' (XLA's convolution), 'winograd' (F(4x4, 3x3)
  # with C++ transforms, float32 on the CPU, faster per layer in training: BENCHMARKS.md) or
  # 'auto' (Winograd on the CPU for float32 layers of >= 16 input channels and >= 32 4x4
  # tiles, if a C++ compiler is found; XLA's elsewhere). Same values and derivatives (any JAX
  # transformation) up to float32 rounding.
  config.conv_algorithm = 'auto'
  # How XLA's convolutions' kernel gradients are computed: 'conv' (XLA's convolution),
  # 'matmul' (one matmul per kernel tap, faster on CPU for large layers) or 'auto' (matmul
  # on CPU for layers whose kernel gradient is >= 2**28 FLOPs). Same values.
  config.weight_grad = 'auto'
  # Start from another run's newest checkpoint, or imported weights (vgg_jax.convert), whose
  # input normalisation the run then adopts. 'net_a' copies conv1_1, conv2_1, conv3_1,
  # conv3_2, fc6, fc7, fc8 (deeper nets from net A, Sec. 3.1), 'all' every layer (S = 384 from
  # S = 256, jittered S from S = 384), 'finetune' every layer but fc8 (a new set of classes).
  # The rest is initialised as `init` says; the optimiser starts afresh.
  config.init_from = config_dict.placeholder(str)
  config.init_mode = 'net_a'
  # Layers left as they are (transfer learning): comma-separated name prefixes, e.g. 'conv'
  # (every convolution), 'conv1,conv2,conv3' (the first three blocks), 'conv,fc6'.
  config.frozen_layers = ''

  # Data.
  config.dataset = 'imagenet2012'  # Any tfds image-classification dataset.
  config.data_dir = config_dict.placeholder(str)  # tfds data_dir; None: tfds' default.
  config.manual_dir = config_dict.placeholder(str)  # Where the ILSVRC-2012 tar files are.
  # Where training keeps a copy of the train split, which it reads by index (ArrayRecord), for a
  # dataset without ArrayRecord twins beside its shards: one prepared elsewhere, read-only, or
  # on gs:// (vgg_jax writes twins when it prepares a dataset on a local data_dir). Written once,
  # by the first run or `python -m vgg_jax.prepare`, about the split's size; never in data_dir.
  # A local or mounted path (ArrayRecord reads no gs://); one every host mounts (NFS) holds one
  # copy for all. None: ~/.cache/vgg_jax/random_access, on each host.
  config.random_access_dir = config_dict.placeholder(str)
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224  # Training crop: a multiple of 32, at most Smin.
  # S: smallest image side after the isotropic rescale. An int is a fixed S; (Smin, Smax)
  # draws S per image uniformly from [Smin, Smax] (scale jittering).
  config.train_scale = config_dict.FieldReference(256, field_type=object)
  # Q for single-scale evaluation; None: S, or (Smin + Smax) / 2 for a jittered S (Sec. 3.2).
  config.eval_scale = config_dict.placeholder(int)
  config.random_flip = True
  # JPEGs: decode only the crop's window (tf.io.decode_and_crop_jpeg) and resize it, rather than
  # decoding and rescaling the whole image; the same crop up to a pixel's rounding, several
  # times cheaper on the host. Other formats are decoded whole.
  config.decode_crop = True
  config.color_shift_std = 0.1  # AlexNet PCA colour shift, alpha ~ N(0, std^2); 0 disables.
  # ILSVRC-2012 training-set mean, 0-255; subtracted on the device.
  config.mean_rgb = (123.68, 116.779, 103.939)
  # The net sees (pixel - mean_rgb) / std_rgb, 0-255 units in RGB order, with its channels in
  # channel_order. The paper: the mean only, RGB. Imported weights record their own
  # (torchvision: std 255 * (0.229, 0.224, 0.225); Caffe and Keras: BGR); see vgg_jax.convert.
  config.std_rgb = (1.0, 1.0, 1.0)
  config.channel_order = 'RGB'
  config.cache = False  # Evaluation: keep encoded examples in memory (small datasets).
  config.strict_data = False  # folder: datasets: a bad file fails preparation, else fixed/skipped.
  config.max_image_pixels = 40_000_000  # folder: datasets: larger images downscaled when prepared.

  # Test protocol (Sec. 3.2): `python -m vgg_jax.evaluate`, and during training.
  config.test_scales = ()  # Q of multi-scale tests; (): S-32, S, S+32 or Smin, mid, Smax.
  config.test_flip = True  # Average each test image / crop with its horizontal flip.
  config.dense_batch_size = 32  # Whole images per dense-evaluation batch (global).
  config.multicrop_batch_size = 8  # Images per multi-crop batch, 50 crops each (global).
  # Dense inputs are padded up to multiples of dense_size_step and their long side cropped
  # to dense_max_aspect * Q, bounding the distinct shapes, hence compilations, per scale.
  config.dense_size_step = 64
  config.dense_max_aspect = 2.0
  # Protocols ('single', 'dense', 'multicrop', 'dense+multicrop' or 'all', comma-separated)
  # also run during training, every eval_protocols_every_steps (-1: once, at the end).
  config.eval_protocols = ''
  config.eval_protocols_every_steps = -1

  # Optimisation: mini-batch SGD with momentum and L2 weight decay (Sec. 3.1).
  # Global, across all devices and hosts, and split evenly over the devices (so divisible by
  # their number); eval_batch_size, dense_ and multicrop_batch_size are global too.
  config.batch_size = 256
  # Each device's share is run as grad_accum_steps micro-batches whose gradients are averaged
  # before the update: the paper's batch of 256 on devices that hold fewer images.
  config.grad_accum_steps = 1
  config.eval_batch_size = 256
  config.learning_rate = 0.01
  config.momentum = 0.9
  # Where the learning rate enters: 'caffe' (the paper's Caffe: v <- mu v - lr (g + wd w),
  # w <- w + v; after a drop the buffer still carries the old rate's steps) or 'pytorch'
  # (v <- mu v + g + wd w, w <- w - lr v; a drop shrinks the buffer at once).
  config.sgd_form = 'caffe'
  config.weight_decay = 5e-4  # On weights; biases are not decayed.
  # The learning rate is divided by lr_plateau_factor when validation top-1 error has not
  # improved for lr_plateau_patience evaluations, at most lr_max_decreases times.
  config.lr_plateau_factor = 0.1
  config.lr_plateau_patience = 3
  config.lr_max_decreases = 3
  config.num_epochs = 74.0  # 370K iterations at batch 256.
  config.num_train_steps = -1  # > 0 overrides num_epochs.
  # A step whose loss or gradients are NaN/inf never updates the parameters; False: training
  # stops there, naming the step; True: such steps are skipped and counted.
  config.skip_nonfinite_steps = False

  # Bookkeeping.
  config.log_every_steps = 100
  config.eval_every_steps = -1  # -1: once per epoch.
  config.checkpoint_every_steps = 5_000
  config.keep_checkpoints = 3
  config.seed = 0
  # A resumed run reads the global batches an uninterrupted one would, on any number of hosts
  # and devices; with another batch_size, seed or train_split it cannot, and is refused unless
  # this is True (the new order then applies from the resume step on).
  config.allow_data_order_change = False
  set_training_scale(config, arg)
  return config
