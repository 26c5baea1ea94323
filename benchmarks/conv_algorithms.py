r"""config.conv_algorithm per layer: Winograd's F(4x4, 3x3) (`vgg_jax.winograd`) against XLA's
convolution, for accuracy and speed, and what 'auto' picks.

  python -m benchmarks.conv_algorithms --variant=D --image_size=224 --batch=8
  python -m benchmarks.conv_algorithms --variant=D --image_size=224 --batch=1

For every 3x3 layer of the net: max |Winograd - XLA| / max |XLA| of the output, the input
gradient and the kernel gradient of the convolution + bias (float32, batch 2); then the
forward, and the forward + both gradients, of `models.Conv` with its ReLU (as the net runs
it) on each algorithm, and Winograd's forward with U made beforehand (as vgg_jax.features
and predict keep it), timed in turns (median of --steps). This is the measurement behind
`winograd.uses_winograd`'s thresholds; whole nets against torchvision are
benchmarks/inference.py's and benchmarks/train_step.py's.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks import winograd as xla_ops_winograd
from benchmarks.winograd import layer_shapes
from vgg_jax import models
from vgg_jax import winograd

# --variant, --image_size, --batch, --steps, --json and --smoke are benchmarks.winograd's.
FLAGS = flags.FLAGS
ALGORITHMS = ('xla', 'winograd')


def layer(features: int, algorithm: str, relu: bool = True) -> models.Conv:
  return models.Conv(features, 3, relu=relu, conv_algorithm=algorithm)


def errors(shape, rng) -> dict:
  """max |Winograd - XLA| / max |XLA| of y, dx and dkernel on a batch of 2, without the ReLU
  (whose gradient jumps where float32 rounding puts a pre-activation on the other side of
  zero: a flip, not an error of the algorithm)."""
  _, side, channels, features = shape
  x = jnp.asarray(rng.normal(0, 1, (2, side, side, channels)), jnp.float32)
  params = layer(features, 'xla', relu=False).init(jax.random.key(0), x)
  dy = jnp.asarray(rng.normal(0, 1, (2, side, side, features)), jnp.float32)
  outs = []
  for algorithm in ALGORITHMS:
    conv = layer(features, algorithm, relu=False)
    y, vjp = jax.jit(lambda p, x, conv=conv: jax.vjp(conv.apply, p, x))(params, x)
    dparams, dx = vjp(dy)
    outs.append((y, dx, dparams['params']['kernel']))
  return {part: float(jnp.abs(a - b).max() / jnp.abs(b).max())
          for part, a, b in zip(('y', 'dx', 'dkernel'), *outs[::-1])}


def candidates(shape, batch, rng) -> dict:
  _, side, channels, features = shape
  x = jnp.asarray(rng.normal(0, 1, (batch, side, side, channels)), jnp.float32)
  dy = jnp.asarray(rng.normal(0, 1, (batch, side, side, features)), jnp.float32)
  out = {}
  for algorithm in ALGORITHMS:
    conv = layer(features, algorithm)
    params = conv.init(jax.random.key(0), x[:1])
    forward = jax.jit(conv.apply)
    both = jax.jit(jax.grad(lambda p, x, conv=conv: jnp.vdot(conv.apply(p, x), dy),
                            (0, 1)))
    out[f'{algorithm} forward'] = lambda f=forward, p=params: jax.block_until_ready(f(p, x))
    out[f'{algorithm} train'] = lambda f=both, p=params: jax.block_until_ready(f(p, x))
  # Inference: U made once beforehand, as vgg_jax.features and predict keep it.
  kept = {**params, models.WINOGRAD: winograd.transformed_kernels(
      {'layer': params['params']}, 'winograd', jnp.float32)['layer']}
  out['winograd kept forward'] = lambda f=forward, p=kept: jax.block_until_ready(f(p, x))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  reason = winograd.unavailable_reason()
  if reason:
    raise app.UsageError(f'No Winograd kernels here: {reason}.')
  variant, size, batch, width, num_steps = xla_ops_winograd.settings()
  rng = np.random.default_rng(0)
  rows = []
  print(f'{variant} at {size}, batch {batch}, width {width:g}, float32, '
        f'{jax.local_devices()[0].device_kind}, jax {jax.__version__}: ms per call (median of '
        f'{num_steps}, in turns) and error against XLA')
  print(f'{"layer":8} {"shape (N,H,C,K)":>18} {"auto":>8} {"fwd xla":>8} {"winograd":>9} '
        f'{"U kept":>7} {"train xla":>10} {"winograd":>9}   {"err y":>7} {"dx":>7} '
        f'{"dkernel":>7}')
  for name, side, channels, features in layer_shapes(variant, size, width):
    shape = (batch, side, channels, features)
    error = errors(shape, rng)
    results = timing.in_turns(candidates(shape, batch, rng), num_steps,
                              warmup=0 if FLAGS.smoke else 1, block=1)
    ms = {k: 1e3 * r['median_step_s'] for k, r in results.items()}
    x_shape, kernel_shape = (batch, side, side, channels), (3, 3, channels, features)
    auto = winograd.uses_winograd('auto', x_shape, kernel_shape, jnp.float32)
    # With U kept (vgg_jax.features, predict), 'auto' takes Winograd on fewer tiles.
    kept = winograd.uses_winograd('auto', x_shape, kernel_shape, jnp.float32, transformed=True)
    rows.append({'layer': name, 'shape': shape, 'auto': 'winograd' if auto else 'xla',
                 'auto_inference': 'winograd kept' if kept else 'xla', 'ms': ms,
                 'error': error})
    print(f'{name:8} {str(shape):>18} {rows[-1]["auto"]:>8} {ms["xla forward"]:8.1f} '
          f'{ms["winograd forward"]:9.1f} {ms["winograd kept forward"]:7.1f} '
          f'{ms["xla train"]:10.1f} {ms["winograd train"]:9.1f}'
          f'   {error["y"]:7.1e} {error["dx"]:7.1e} {error["dkernel"]:7.1e}')
  totals = {k: sum(r['ms'][k] for r in rows) for k in rows[0]['ms']}
  totals['auto forward'] = sum(r['ms'][f'{r["auto"]} forward'] for r in rows)
  totals['auto inference (U kept)'] = sum(r['ms'][f'{r["auto_inference"]} forward']
                                          for r in rows)
  totals['auto train'] = sum(r['ms'][f'{r["auto"]} train'] for r in rows)
  print('total (ms): ' + ', '.join(f'{k} {v:.0f}' for k, v in totals.items()))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'rows': rows, 'totals': totals, 'versions': {'jax': jax.__version__},
                 'setting': {'variant': variant, 'image_size': size, 'batch': batch,
                             'width': width}}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
