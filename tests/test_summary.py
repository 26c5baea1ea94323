"""`vgg_jax.summary`'s per-layer counts against the model itself, Table 2 and known figures."""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from vgg_jax import models
from vgg_jax import summary


@pytest.mark.parametrize('variant', models.VARIANTS)
@pytest.mark.parametrize('image_size,width,num_classes', [(224, 1.0, 1000), (64, 0.25, 10)])
def test_parameter_counts_are_the_models_own(variant, image_size, width, num_classes):
  model = models.VGG(variant=variant, width=width, num_classes=num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
  expected = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes['params']))
  rows = summary.layers(variant, image_size, width, num_classes)
  assert summary.totals(variant, image_size, width, num_classes)['params'] == expected
  # Every weight layer of the model is a row, in the paper's order.
  assert [r.name for r in rows if r.params] == list(models.layer_names(variant))


@pytest.mark.parametrize('variant,millions', [('A', 133), ('A-LRN', 133), ('B', 133),
                                              ('C', 134), ('D', 138), ('E', 144)])
def test_totals_round_to_table2(variant, millions):
  assert round(summary.totals(variant)['params'] / 1e6) == millions


def test_net_d_costs_15_47_g_multiply_adds_and_15_2_m_activations_per_image():
  totals = summary.totals('D')
  assert round(totals['macs'] / 1e7) == 1547  # The widely quoted 15.47 G.
  # Written out by hand: input, 13 conv outputs, 5 pools, 3 fc outputs at 224.
  hand = (224 * 224 * 3 + 2 * 224 * 224 * 64 + 112 * 112 * 64 + 2 * 112 * 112 * 128
          + 56 * 56 * 128 + 3 * 56 * 56 * 256 + 28 * 28 * 256 + 3 * 28 * 28 * 512
          + 14 * 14 * 512 + 3 * 14 * 14 * 512 + 7 * 7 * 512 + 4096 + 4096 + 1000)
  assert totals['activations'] == hand and round(hand / 1e5) == 152
  assert summary.train_flops_per_image('D') == 6 * totals['macs']
  assert round(summary.train_flops_per_image('D') / 1e8) == 928  # 92.8 GFLOP.


def test_table_has_a_row_per_layer_and_explains_the_cs231n_figure():
  text = summary.table('D')
  assert text.count('| conv') == 13 and text.count('| pool') == 5 and text.count('| fc') == 3
  assert '138,357,544' in text and '15.47 G multiply-adds' in text
  assert 'CS231n' in text and '24M' in text


def test_unknown_variant_raises_naming_the_valid_ones():
  with pytest.raises(ValueError, match="variant='F'.*A, A-LRN, B, C, D, E"):
    summary.layers('F')


@pytest.mark.parametrize('image_size', [100, 0, -32])
def test_sizes_that_are_not_positive_multiples_of_32_are_refused(image_size):
  with pytest.raises(ValueError, match=rf'^image_size={image_size}: must be a positive multiple '
                     'of 32'):
    summary.layers('D', image_size=image_size)


def test_command_line_refuses_a_size_in_one_line():
  result = subprocess.run([sys.executable, '-m', 'vgg_jax.summary', '--image_size=100'],
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 1 and result.stdout == ''
  assert result.stderr.strip() == ('vgg_jax.summary: image_size=100: must be a positive '
                                   'multiple of 32 (five 2x2 max-pools), e.g. 224.')


def test_dense_multiply_adds_are_the_convolutions_over_the_image_and_the_head_per_window():
  """Net A at 1/16 width, training size 64, on a 96 x 128 input, counted by hand: Table 1's
  convolutions (4-32 channels) at 96 x 128 and its halvings; pool5 is 3 x 4, so fc6's 2 x 2
  window has 2 x 3 positions, each running fc6 (2 * 2 * 32 -> 256), fc7 and fc8 (10)."""
  convs = [(3, 4, 96 * 128), (4, 8, 48 * 64), (8, 16, 24 * 32), (16, 16, 24 * 32),
           (16, 32, 12 * 16), (32, 32, 12 * 16), (32, 32, 6 * 8), (32, 32, 6 * 8)]
  expected = sum(9 * cin * cout * area for cin, cout, area in convs)
  expected += 2 * 3 * (2 * 2 * 32 * 256 + 256 * 256 + 256 * 10)
  assert summary.dense_macs('A', (96, 128), 64, 1 / 16, 10) == expected
  for variant in models.VARIANTS:
    assert summary.dense_macs(variant, (224, 224)) == summary.totals(variant)['macs']
  with pytest.raises(ValueError, match='multiple of 32'):
    summary.dense_macs('A', (100, 128), 64)
