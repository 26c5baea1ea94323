"""The paper's experiments in miniature: 1/8-width nets on `scaled_digits` (docs/reproduction.md).

  --config=experiments/mini/config.py:D,S=36-72

The argument names the net of Table 1 and the training scale. Every length is the paper's
divided by 7 (the crop 224 -> 32): S = 36 and 54 play 256 and 384, S in [36, 72] plays
[256, 512], and the test scales follow (`TEST_SCALES`), so each crop covers the same share of
its image as in the paper.
"""

from typing import Optional

from experiments import digits

TRAINING_SCALES = {'S=36': 36, 'S=54': 54, 'S=36-72': (36, 72)}
# The paper's test scales divided by 7: {S - 32, S, S + 32} -> {S - 4, S, S + 4}; jittered
# {Smin, (Smin + Smax) / 2, Smax} -> {36, 54, 72}.
TEST_SCALES = {'S=36': (32, 36, 40), 'S=54': (50, 54, 58), 'S=36-72': (36, 54, 72)}


def get_config(arg: Optional[str] = 'D,S=36'):
  """arg: 'NET,S=...', NET one of A, A-LRN, B, C, D, E; S=36, S=54 or S=36-72."""
  variant, _, scale = (arg or 'D,S=36').partition(',')
  if scale not in TRAINING_SCALES:
    raise ValueError(f'Config argument {arg!r}: expected NET,S with S one of '
                     f'{", ".join(TRAINING_SCALES)}, e.g. experiments/mini/config.py:D,S=36.')
  config = digits.get_config()  # 1/8 width, Glorot, no flips, cached, batch 64, crop 32.
  config.variant = variant
  config.init_std_as_full_size = True  # For 'paper': each layer's gain as in the full net.
  config.dataset = 'scaled_digits'
  config.train_scale = TRAINING_SCALES[scale]
  config.test_scales = TEST_SCALES[scale]
  config.mean_rgb = (62.2, 62.2, 62.2)  # The training images' own mean (Sec. 2.1).
  config.dense_batch_size = 60
  config.learning_rate = 0.01
  config.lr_plateau_patience = 3
  config.num_epochs = 10  # 890 steps at batch 64.
  config.log_every_steps = 25
  config.checkpoint_every_steps = 1_000
  config.keep_checkpoints = 1
  return config
