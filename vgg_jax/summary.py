"""Per-layer cost of a VGG net: output shape, parameters, multiply-adds, activations (Table 2).

Counted from the spec table (`models.VGG_SPECS`), layer by layer, so the totals can be checked
against the paper's Table 2 (parameters) and the usual figures (net D at 224: 15.47 G
multiply-adds, 138.4 M parameters). The benchmarks turn the multiply-adds into model FLOPs: a
training image costs 3 forward passes' worth (forward, and a backward twice as costly), 2 FLOPs
per multiply-add, 92.8 GFLOP for net D.

    python -m vgg_jax.summary --variant=D [--image_size=224] [--width=1.0] [--num_classes=1000]
"""

import dataclasses
import math
import sys
from typing import Sequence

from vgg_jax import models


@dataclasses.dataclass(frozen=True)
class Layer:
  name: str
  shape: tuple[int, ...]  # Output (height, width, channels), or (features,).
  params: int
  macs: int  # Multiply-adds per image.

  @property
  def activations(self) -> int:
    return math.prod(self.shape)


def layers(variant: str = 'D', image_size: int = 224, width: float = 1.0,
           num_classes: int = 1000) -> Sequence[Layer]:
  """The input, every weight layer, LRN and max-pool of `variant`, in order, for one image."""
  if variant not in models.VGG_SPECS:
    raise ValueError(f'variant={variant!r}: expected one of {", ".join(models.VARIANTS)}.')
  if image_size <= 0 or image_size % models.DOWNSAMPLING:
    raise ValueError(f'image_size={image_size}: must be a positive multiple of '
                     f'{models.DOWNSAMPLING} (five 2x2 max-pools), e.g. 224.')
  size, channels = image_size, 3
  rows = [Layer('input', (size, size, channels), 0, 0)]
  for block, specs in enumerate(models.VGG_SPECS[variant], start=1):
    index = 0
    for spec in specs:
      if spec == models.LRN:
        rows.append(Layer(f'lrn{block}', (size, size, channels), 0, 0))
        continue
      index += 1
      kernel, out = spec[0], models.scaled(spec[1], width)
      rows.append(Layer(f'conv{block}_{index}', (size, size, out),
                        kernel * kernel * channels * out + out,
                        size * size * kernel * kernel * channels * out))
      channels = out
    size //= 2
    rows.append(Layer(f'pool{block}', (size, size, channels), 0, 0))
  features = size * size * channels
  for name, out in (('fc6', models.scaled(models.FC_WIDTH, width)),
                    ('fc7', models.scaled(models.FC_WIDTH, width)), ('fc8', num_classes)):
    rows.append(Layer(name, (out,), features * out + out, features * out))
    features = out
  return rows


def totals(variant: str = 'D', image_size: int = 224, width: float = 1.0,
           num_classes: int = 1000) -> dict[str, int]:
  rows = layers(variant, image_size, width, num_classes)
  return {'params': sum(r.params for r in rows), 'macs': sum(r.macs for r in rows),
          'activations': sum(r.activations for r in rows)}


def dense_macs(variant: str, size: tuple[int, int], image_size: int = 224, width: float = 1.0,
               num_classes: int = 1000) -> int:
  """Multiply-adds of one pass of the net applied densely (Sec. 3.2) to a (height, width)
  input, each a multiple of 32: the convolutions over all of it, fc6 as a (image_size /
  32)^2-window convolution over pool5, and fc7 and fc8 at each of fc6's outputs. At
  (image_size, image_size), `totals`' count."""
  height, width_px = size
  if height % models.DOWNSAMPLING or width_px % models.DOWNSAMPLING or min(size) < image_size:
    raise ValueError(f'size={size}: each side must be a multiple of {models.DOWNSAMPLING} and '
                     f'at least image_size={image_size}.')
  rows = layers(variant, image_size, width, num_classes)
  convs = sum(r.macs for r in rows if r.name.startswith('conv'))
  fcs = sum(r.macs for r in rows if r.name.startswith('fc'))
  grid = image_size // models.DOWNSAMPLING
  locations = ((height // models.DOWNSAMPLING - grid + 1) *
               (width_px // models.DOWNSAMPLING - grid + 1))
  return convs * height * width_px // image_size ** 2 + locations * fcs


def train_flops_per_image(variant: str, image_size: int = 224, width: float = 1.0,
                          num_classes: int = 1000) -> float:
  """Model FLOPs of one training image: 2 FLOPs per multiply-add, forward plus a backward
  pass of twice its cost (the convention of MFU figures)."""
  return 6.0 * totals(variant, image_size, width, num_classes)['macs']


def table(variant: str = 'D', image_size: int = 224, width: float = 1.0,
          num_classes: int = 1000) -> str:
  """A markdown table of `layers`, with totals and how they relate to the CS231n figures."""
  rows = layers(variant, image_size, width, num_classes)
  lines = [f'VGG {variant} at {image_size}x{image_size}, width {width:g}, '
           f'{num_classes} classes (one image, forward)', '',
           '| layer | output | parameters | multiply-adds | activations | float32 |',
           '|---|---|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f'| {r.name} | {"x".join(map(str, r.shape))} | {r.params:,} | {r.macs:,} | '
                 f'{r.activations:,} | {4 * r.activations / 2**20:.2f} MiB |')
  t = totals(variant, image_size, width, num_classes)
  lines += [f'| **total** | | **{t["params"]:,}** | **{t["macs"]:,}** | '
            f'**{t["activations"]:,}** | **{4 * t["activations"] / 1e6:.1f} MB** |', '',
            f'{t["params"] / 1e6:.1f} M parameters, {t["macs"] / 1e9:.2f} G multiply-adds, '
            f'{train_flops_per_image(variant, image_size, width, num_classes) / 1e9:.1f} GFLOP '
            f'per training image, {t["activations"] / 1e6:.1f} M activation values per image '
            f'({4 * t["activations"] / 1e6:.0f} MB in float32, input included).']
  if (variant, image_size, width) == ('D', 224, 1.0):
    lines.append(
        'The widely quoted CS231n table gives "24M values / 93 MB (x2 for backward)" for this '
        'net, but its own per-layer rows add up to the 15.2 M counted here; training keeps '
        'more than this (ReLU masks, pooling indices, gradients), which the benchmarks measure '
        'as peak device memory per image.')
  return '\n'.join(lines)


def main(argv) -> None:
  del argv
  try:
    print(table(FLAGS.variant, FLAGS.image_size, FLAGS.width, FLAGS.num_classes))
  except ValueError as e:
    sys.exit(f'vgg_jax.summary: {e}')


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vgg_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum('variant', 'D', list(models.VARIANTS), 'Configuration of Table 1.')
  flags.DEFINE_integer('image_size', 224, 'Input size (a multiple of 32).')
  flags.DEFINE_float('width', 1.0, 'Channel multiplier.')
  flags.DEFINE_integer('num_classes', 1000, 'Width of fc8.')
  FLAGS = flags.FLAGS
  cli.run(main)
