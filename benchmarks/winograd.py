"""Winograd's minimal filtering for VGG's 3x3 convolutions, written in XLA ops, per layer.

Lavin & Gray ("Fast Algorithms for Convolutional Neural Networks", CVPR 2016) compute a 3x3,
stride-1 convolution on m x m output tiles as Y = A^T [(G g G^T) * (B^T d B)] A: F(2x2, 3x3)
takes 16 multiplies per 4 outputs (2.25x fewer than direct), F(4x4, 3x3) 36 per 16 (4x), the
products becoming (m+2)^2 batched matmuls over channels. Whether that pays on a CPU depends on
the transforms, which are memory-bound. This script times, for every convolution of a net at a
given size and batch, side by side in turns: XLA's convolution (what `vgg_jax` runs), F(2x2,
3x3) and F(4x4, 3x3) written as jnp slices, sums and one batched matmul (both with and
without gradients: autodiff of the transforms gives the input and kernel gradients in the
Winograd domain), the batched matmul alone (the floor the transforms add to), and PyTorch's
oneDNN convolution where torch is installed. Each Winograd output is first checked against
XLA's convolution at float32 'highest' precision (max |error| / max |reference|).

  python -m benchmarks.winograd --variant=D --image_size=224 --batch=8
  python -m benchmarks.winograd --smoke

Measured here it does not pay: see BENCHMARKS.md, "Winograd convolutions". `vgg_jax` keeps
XLA's convolutions.
"""

import functools
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from benchmarks import timing
from vgg_jax import models
from vgg_jax import ops

FLAGS = flags.FLAGS
flags.DEFINE_enum('variant', 'D', list(models.VARIANTS), 'Configuration of Table 1.')
flags.DEFINE_integer('image_size', 224, 'Input size.')
flags.DEFINE_integer('batch', 8, 'Images per call.')
flags.DEFINE_integer('steps', 4, 'Timed calls per candidate; the median is reported.')
flags.DEFINE_bool('grad', False, 'Time forward + input and kernel gradients instead.')
flags.DEFINE_string('json', None, 'Also write the results as JSON to this path.')
flags.DEFINE_bool('smoke', False, 'CI settings: net A at 1/8 width, 32x32, batch 2.')

# Lavin & Gray (2016), Sec. 4.1 (F(2x2, 3x3)) and 4.2 (F(4x4, 3x3)): B^T, G, A^T.
TRANSFORMS = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]])),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]])),
}


def _combine(parts, coefficients):
  """sum_u coefficients[u] * parts[u]: zeros skipped, +-1 as additions."""
  total = None
  for c, part in zip(coefficients, parts):
    if c == 0:
      continue
    term = part if c == 1 else -part if c == -1 else part * jnp.asarray(c, part.dtype)
    total = term if total is None else total + term
  return total


def winograd_conv(x: jax.Array, kernel: jax.Array, tile: int) -> jax.Array:
  """`ops.conv` (3x3, stride 1, 'SAME', NHWC x HWIO) by F(tile x tile, 3x3).

  Each transform is applied along rows, then columns; the half-transformed tensor is kept
  whole (an optimisation barrier), else XLA fuses the row pass into all (tile+2)^2 outputs
  and recomputes it for each.
  """
  bt, g, at = TRANSFORMS[tile]
  m, a = tile, tile + 2
  n, h, w, c = x.shape
  th, tw = -(-h // m), -(-w // m)
  xp = jnp.pad(x, ((0, 0), (1, th * m + 1 - h), (1, tw * m + 1 - w), (0, 0)))
  rows = [xp[:, u:u + th * m:m] for u in range(a)]  # Row u of every tile.
  rows = lax.optimization_barrier(jnp.stack([_combine(rows, bt[i]) for i in range(a)]))
  v = [_combine([rows[i, :, :, u:u + tw * m:m] for u in range(a)], bt[j])
       for i in range(a) for j in range(a)]
  v = jnp.stack(v).reshape(a * a, n * th * tw, c)
  g = jnp.asarray(g, kernel.dtype)
  u = jnp.einsum('ik,klcf,jl->ijcf', g, kernel, g).reshape(a * a, c, -1)
  products = jnp.einsum('epc,ecf->epf', v, u).reshape(a, a, n, th, tw, -1)
  half = lax.optimization_barrier(
      jnp.stack([_combine([products[k] for k in range(a)], at[i]) for i in range(m)]))
  y = jnp.stack([_combine([half[i, k] for k in range(a)], at[j])
                 for i in range(m) for j in range(m)])
  y = y.reshape(m, m, n, th, tw, -1).transpose(2, 3, 0, 4, 1, 5)
  return y.reshape(n, th * m, tw * m, -1)[:, :h, :w]


def torch_conv(x, kernel):
  """PyTorch's forward convolution of the same arrays (channels_last), or None."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
  tw = torch.from_numpy(np.array(kernel)).permute(3, 2, 0, 1).contiguous(
      memory_format=torch.channels_last)

  def call():
    with torch.no_grad():
      torch.nn.functional.conv2d(tx, tw, padding=1)
  return call


def layer_shapes(variant: str, size: int, width: float) -> list[tuple[str, int, int, int]]:
  """(name, input side, in channels, out channels) of every 3x3 convolution."""
  shapes, channels, side = [], 3, size
  for block, specs in enumerate(models.VGG_SPECS[variant], start=1):
    convs = [s for s in specs if s != models.LRN]
    for i, spec in enumerate(convs, start=1):
      kernel_size, features = spec
      features = models.scaled(features, width)
      if kernel_size == 3:
        shapes.append((f'conv{block}_{i}', side, channels, features))
      channels = features
    side //= 2
  return shapes


def settings() -> tuple[str, int, int, float, int]:
  """(variant, image size, batch, width, timed steps) from the flags; --smoke's tiny net."""
  if FLAGS.smoke:
    return 'A', 32, 2, 0.125, 1
  return FLAGS.variant, FLAGS.image_size, FLAGS.batch, 1.0, FLAGS.steps


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  variant, size, batch, width, num_steps = settings()
  rng = np.random.default_rng(0)
  results = []
  for name, side, cin, cout in layer_shapes(variant, size, width):
    x = jnp.asarray(rng.normal(0, 1, (batch, side, side, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(0, (9 * cin) ** -0.5, (3, 3, cin, cout)), jnp.float32)
    forms = {'xla': ops.conv, 'F(2x2,3x3)': functools.partial(winograd_conv, tile=2),
             'F(4x4,3x3)': functools.partial(winograd_conv, tile=4)}
    with jax.default_matmul_precision('highest'):
      reference = np.asarray(jax.jit(ops.conv)(x, kernel), np.float64)
    row = {'layer': name, 'shape': [batch, side, side, cin, cout], 'error': {}}
    for form in ('F(2x2,3x3)', 'F(4x4,3x3)'):
      y = np.asarray(jax.jit(forms[form])(x, kernel), np.float64)
      row['error'][form] = float(np.abs(y - reference).max() / np.abs(reference).max())
    if FLAGS.grad:
      calls = {k: jax.jit(jax.grad(lambda x, w, f=f: jnp.vdot(f(x, w), x[..., :1]), (0, 1)))
               for k, f in forms.items()}
    else:
      calls = {k: jax.jit(f) for k, f in forms.items()}
    candidates = {k: functools.partial(lambda f: jax.block_until_ready(f(x, kernel)), f)
                  for k, f in calls.items()}
    tiles = batch * (-(-side // 4)) ** 2
    v, u = jnp.ones((36, tiles, cin)), jnp.ones((36, cin, cout))
    matmul = jax.jit(lambda v, u: jnp.einsum('epc,ecf->epf', v, u))
    candidates['F(4x4) matmul alone'] = lambda: jax.block_until_ready(matmul(v, u))
    torch_call = None if FLAGS.grad else torch_conv(x, kernel)
    if torch_call is not None:
      candidates['torch (oneDNN)'] = torch_call
    timings = timing.in_turns(candidates, num_steps, 1, 1)
    row['ms'] = {k: 1e3 * r['median_step_s'] for k, r in timings.items()}
    results.append(row)

  names = list(results[0]['ms'])
  print(f'{variant} at {size}x{size}, batch {batch}, {"forward+gradients" if FLAGS.grad else "forward"}'
        f', float32, ms per call (median of {num_steps}); error: max |Winograd - XLA| / max |XLA|')
  print(f'{"layer":<9}' + ''.join(f'{n:>21}' for n in names) + f'{"err F(2x2)":>12}{"err F(4x4)":>12}')
  for row in results:
    print(f'{row["layer"]:<9}' + ''.join(f'{row["ms"][n]:>21.1f}' for n in names)
          + f'{row["error"]["F(2x2,3x3)"]:>12.1e}{row["error"]["F(4x4,3x3)"]:>12.1e}')
  totals = {n: sum(r['ms'][n] for r in results) for n in names}
  print(f'{"total":<9}' + ''.join(f'{totals[n]:>21.1f}' for n in names))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'variant': variant, 'image_size': size, 'batch': batch, 'grad': FLAGS.grad,
                 'results': results, 'totals_ms': totals}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
