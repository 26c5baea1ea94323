"""The embedded default: a narrow VGG on scikit-learn's handwritten digits, minutes on a CPU.

1,437 training and 360 held-out real digits, upsampled to 32x32 RGB, through the same tfds ->
tf.data -> pmap -> Orbax path as ImageNet. Scale jittering S in [32, 36] plays the role of
[256, 512]; flips are off, since a mirrored digit is another symbol.
"""

from vgg_jax import default_config


def get_config():
  config = default_config.get_config()
  config.variant = 'D'
  config.width = 0.125  # 8-64 conv channels, 512-wide fc6/fc7.
  config.init = 'glorot'
  config.num_classes = 10
  config.dataset = 'sklearn_digits'
  config.eval_split = 'test'
  config.image_size = 32
  config.train_scale = (32, 36)
  config.random_flip = False
  config.test_flip = False
  config.mean_rgb = (77.9, 77.9, 77.9)  # The digits' own mean, as Sec. 2.1 prescribes.
  config.cache = True
  config.batch_size = 64
  config.eval_batch_size = 120
  config.dense_batch_size = 120
  config.multicrop_batch_size = 40
  config.dense_size_step = 32
  config.learning_rate = 0.005
  config.lr_plateau_patience = 4
  config.num_epochs = 40
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  return config
