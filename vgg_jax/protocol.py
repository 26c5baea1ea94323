"""Sec. 3.2's rules for training and test scales, and the test protocols, as pure Python.

Training rescales each image isotropically so its smallest side is S (fixed, or drawn from
[Smin, Smax] per image: scale jittering) and takes a random crop; testing rescales to Q and
scores the image densely or as a 5 x 5 grid of crops, at one Q or several. The input pipeline
prepares images by these rules and the evaluation averages what they give: both read them
here. No JAX, no TensorFlow.
"""

from typing import Callable, Sequence

from vgg_jax import errors

DENSE, MULTICROP = 'dense', 'multicrop'
PROTOCOLS = ('single', 'dense', 'multicrop', 'dense+multicrop')
# Which passes (method, which scales) each protocol averages.
_PASSES = {'single': ((DENSE, 'single'),), 'dense': ((DENSE, 'all'),),
           'multicrop': ((MULTICROP, 'all'),),
           'dense+multicrop': ((DENSE, 'all'), (MULTICROP, 'all'))}
# Per scale, a 5 x 5 grid of crops, each with its horizontal flip.
CROP_GRID = 5


def parse_protocols(spec: str, name: str = '--protocol') -> tuple[str, ...]:
  """'all' or a comma-separated list of PROTOCOLS, checked."""
  names = PROTOCOLS if spec == 'all' else tuple(p.strip() for p in spec.split(',') if p.strip())
  if not names or any(p not in PROTOCOLS for p in names):
    raise errors.ConfigError(f'{name}={spec!r}: expected "all" or a comma-separated list of '
                             f'{", ".join(PROTOCOLS)}.')
  return names


def scale_bounds(train_scale) -> tuple[int, int]:
  """(Smin, Smax) of a fixed S or an (Smin, Smax) pair (Sec. 3.1), checked."""
  fail = lambda why: errors.bad_field('train_scale', train_scale, why)
  if isinstance(train_scale, bool):
    raise fail('expected S or (Smin, Smax).')
  if isinstance(train_scale, int):
    bounds = (train_scale, train_scale)
  elif isinstance(train_scale, (tuple, list)) and len(train_scale) == 2 and all(
      isinstance(s, int) and not isinstance(s, bool) for s in train_scale):
    bounds = tuple(train_scale)
  else:
    raise fail('expected an int S or a pair (Smin, Smax) of ints.')
  if bounds[0] > bounds[1]:
    raise fail(f'Smin={bounds[0]} > Smax={bounds[1]}; write the range as (Smin, Smax), e.g. '
               '(256, 512).')
  if bounds[0] <= 0:
    raise fail('S must be positive.')
  return bounds


def single_test_scale(config) -> int:
  """Q of single-scale testing: `config.eval_scale`, else S, else (Smin + Smax) / 2."""
  if config.eval_scale:
    return int(config.eval_scale)
  smin, smax = scale_bounds(config.train_scale)
  return (smin + smax) // 2


def test_scales(config) -> tuple[int, ...]:
  """Multi-scale testing: `config.test_scales`, else the paper's {S - 32, S, S + 32} for a
  fixed S and {Smin, (Smin + Smax) / 2, Smax} for a jittered one."""
  if config.test_scales:
    return tuple(int(q) for q in config.test_scales)
  smin, smax = scale_bounds(config.train_scale)
  if smin == smax:
    return (smin - 32, smin, smin + 32)
  return (smin, (smin + smax) // 2, smax)


def check_scales(scales: Sequence[int], image_size: int) -> None:
  small = [q for q in scales if q < image_size]
  if small:
    raise errors.ConfigError(f'Test scales {", ".join(map(str, small))} are smaller than the '
                     f'{image_size}-pixel training crop: every Q must be >= {image_size}.')


def rescaled_shape(height: int, width: int, smallest_side: int) -> tuple[int, int]:
  """The isotropic rescale of training and testing: the smallest side becomes S (or Q), the
  other keeps the aspect ratio, rounded, and is never below it. `input_pipeline.rescale`
  writes the same rule in TensorFlow ops (tests/test_input_pipeline.py checks they agree)."""
  ratio = smallest_side / min(height, width)
  return (max(smallest_side, round(height * ratio)), max(smallest_side, round(width * ratio)))


def crop_offsets(length, crop: int, num: int = CROP_GRID,
                 round_fn: Callable = round) -> list:
  """Top (or left) edges of `num` crops regularly spaced from edge to edge: multi-crop
  testing's grid. `length` may be a TensorFlow scalar, with `round_fn` in its ops."""
  return [round_fn(i * (length - crop) / (num - 1)) for i in range(num)]


def round_up(length, multiple: int):
  """`length` rounded up to a multiple of `multiple` (ints, or TensorFlow scalars)."""
  return -(-length // multiple) * multiple


def dense_shapes_bound(q: int, config) -> int:
  """How many image shapes (hence compilations) dense evaluation at scale `q` can meet.

  The long side is capped at dense_max_aspect * q and both sides are padded up to a
  multiple of dense_size_step: one square shape plus, per orientation, one per step.
  """
  step = config.dense_size_step
  short = round_up(q, step)
  long = round_up(max(q, int(config.dense_max_aspect * q)), step)
  return 1 + 2 * ((long - short) // step)


def protocol_passes(protocols: Sequence[str], single: int,
                    scales: Sequence[int]) -> dict[str, list[tuple[str, int]]]:
  """For each protocol, the (method, Q) passes whose posteriors it averages."""
  passes = {}
  for protocol in protocols:
    passes[protocol] = [(method, q) for method, which in _PASSES[protocol]
                        for q in ((single,) if which == 'single' else scales)]
  return passes


def views_per_image(passes: Sequence[tuple[str, int]], flip: bool) -> int:
  """How many times the net sees each image over `passes`: one dense application or 25
  crops per pass, twice with flips (Table 5's 'crops' column)."""
  views = sum(1 if method == DENSE else CROP_GRID ** 2 for method, _ in passes)
  return views * (2 if flip else 1)
