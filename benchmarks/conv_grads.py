"""Why vgg_jax computes two gradients its own way: per-layer timings of the alternatives.

For every convolution and max-pool of a VGG net at a given size and batch, side by side in
one run:
  * the kernel gradient as XLA's convolution (what `jax.grad` of `lax.conv_general_dilated`
    gives) vs as one matmul per kernel tap (`ops.shifted_matmul_weight_grad`);
  * the 2x2 max-pool's gradient as XLA's select-and-scatter (`nn.max_pool`) vs
    `ops.max_pool_2x2`'s elementwise selects.
and, where PyTorch is installed, each convolution's forward pass in XLA and in PyTorch.
Both gradient alternatives are checked to agree (kernel gradients to 1e-4 relative, pool gradients
bitwise) before they are timed. On a 2-core CPU the XLA forms are several times slower on the
large early layers: hence `VGG(weight_grad='auto')` and `max_pool_2x2`.

  python -m benchmarks.conv_grads --variant=A --image_size=128 --batch=16
  python -m benchmarks.conv_grads --smoke
"""

import json
import statistics
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import models
from vgg_jax import ops
from vgg_jax import summary

FLAGS = flags.FLAGS
flags.DEFINE_enum('variant', 'A', list(models.VARIANTS), 'Configuration of Table 1.')
flags.DEFINE_integer('image_size', 128, 'Input size.')
flags.DEFINE_integer('batch', 16, 'Images per step.')
flags.DEFINE_float('width', 1.0, 'Channel multiplier.')
flags.DEFINE_integer('steps', 5, 'Timed repetitions; the median is reported.')
flags.DEFINE_string('json', None, 'Also write the results as JSON to this path.')
flags.DEFINE_bool('smoke', False, 'CI settings: image_size 32, batch 2, 2 steps.')


def median_seconds(fn, args, num_steps: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(num_steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def xla_weight_grad(x, grad, kernel):
  return jax.vjp(lambda k: ops.conv(x, k), kernel)[1](grad)[0]  # pylint: disable=protected-access


def torch_forward_seconds(x, kernel, num_steps: int):
  """The same convolution's forward pass in PyTorch (channels_last), or None without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  x = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)  # NHWC memory: channels_last.
  weight = torch.from_numpy(np.array(kernel)).permute(3, 2, 0, 1).contiguous(
      memory_format=torch.channels_last)
  pad = kernel.shape[0] // 2
  with torch.no_grad():
    torch.nn.functional.conv2d(x, weight, padding=pad)
    times = []
    for _ in range(num_steps):
      start = time.perf_counter()
      torch.nn.functional.conv2d(x, weight, padding=pad)
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def pool_grad(pool):
  return lambda x, grad: jax.vjp(pool, x)[1](grad)[0]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  size, batch, num_steps = FLAGS.image_size, FLAGS.batch, FLAGS.steps
  if FLAGS.smoke:
    size, batch, num_steps = 32, 2, 2
  rng = np.random.default_rng(0)
  kernel_sizes = dict(zip(models.layer_names(FLAGS.variant), _kernel_sizes(FLAGS.variant)))
  layers = summary.layers(FLAGS.variant, size, FLAGS.width)
  results = []
  for before, layer in zip(layers[:-1], layers[1:]):
    name, shape, previous = layer.name, layer.shape, before.shape
    if name.startswith('conv'):
      kernel_size = kernel_sizes[name]
      x = jnp.asarray(rng.normal(size=(batch, *previous)), jnp.float32)
      grad = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
      kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, previous[-1], shape[-1])),
                           jnp.float32)
      xla = jax.jit(xla_weight_grad)
      matmul = jax.jit(lambda x, g, k=kernel_size: ops.shifted_matmul_weight_grad(x, g, k))
      expected, actual = xla(x, grad, kernel), matmul(x, grad)
      error = float(jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected)))
      if error > 1e-4:
        raise AssertionError(f'{name}: kernel gradients differ by {error:.2e}.')
      results.append({'layer': name, 'gradient': 'kernel', 'shape': [batch, *previous],
                      'xla_s': median_seconds(xla, (x, grad, kernel), num_steps),
                      'vgg_jax_s': median_seconds(matmul, (x, grad), num_steps),
                      'relative_error': error,
                      'forward_xla_s': median_seconds(jax.jit(ops.conv), (x, kernel),  # pylint: disable=protected-access
                                                      num_steps),
                      'forward_torch_s': torch_forward_seconds(x, kernel, num_steps)})
    elif name.startswith('pool'):
      x = jnp.asarray(rng.normal(size=(batch, *previous)), jnp.float32)
      x = x.at[:, ::3].set(0.0)  # Ties, as ReLU leaves them.
      grad = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
      xla = jax.jit(pool_grad(lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))))
      ours = jax.jit(pool_grad(ops.max_pool_2x2))
      if not bool(jnp.all(xla(x, grad) == ours(x, grad))):
        raise AssertionError(f'{name}: max-pool gradients differ.')
      results.append({'layer': name, 'gradient': 'max-pool input', 'shape': [batch, *previous],
                      'xla_s': median_seconds(xla, (x, grad), num_steps),
                      'vgg_jax_s': median_seconds(ours, (x, grad), num_steps),
                      'relative_error': 0.0})
  xla_total = sum(r['xla_s'] for r in results)
  ours_total = sum(r['vgg_jax_s'] for r in results)

  command = ' '.join(['python -m benchmarks.conv_grads', *sys.argv[1:]])
  device = jax.devices()[0]
  print(f'command: {command}')
  print(f'jax {jax.__version__}, device: {device.platform} {device.device_kind}; net '
        f'{FLAGS.variant} width {FLAGS.width:g} at {size}x{size}, batch {batch}, median of '
        f'{num_steps}')
  header = f'{"layer":<9}{"gradient":<16}{"input":>20}{"XLA ms":>10}{"vgg_jax ms":>12}{"speed-up":>10}'
  print(header)
  print('-' * len(header))
  for r in results:
    print(f'{r["layer"]:<9}{r["gradient"]:<16}{"x".join(map(str, r["shape"])):>20}'
          f'{1e3 * r["xla_s"]:>10.1f}{1e3 * r["vgg_jax_s"]:>12.1f}'
          f'{r["xla_s"] / r["vgg_jax_s"]:>9.2f}x')
  print(f'{"total":<45}{1e3 * xla_total:>10.1f}{1e3 * ours_total:>12.1f}'
        f'{xla_total / ours_total:>9.2f}x')
  convs = [r for r in results if r.get('forward_torch_s')]
  if convs:
    print('forward convolutions, XLA (as vgg_jax runs them) vs PyTorch channels_last:')
    for r in convs:
      print(f'  {r["layer"]:<9}{1e3 * r["forward_xla_s"]:>8.1f} ms {1e3 * r["forward_torch_s"]:>8.1f}'
            f' ms   XLA / torch time {r["forward_xla_s"] / r["forward_torch_s"]:.2f}')
    xla_fwd = sum(r['forward_xla_s'] for r in convs)
    torch_fwd = sum(r['forward_torch_s'] for r in convs)
    print(f'  {"total":<9}{1e3 * xla_fwd:>8.1f} ms {1e3 * torch_fwd:>8.1f} ms   XLA / torch time '
          f'{xla_fwd / torch_fwd:.2f}')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'command': command, 'jax_version': jax.__version__,
                 'platform': device.platform, 'device_kind': device.device_kind,
                 'results': results, 'xla_total_s': xla_total, 'vgg_jax_total_s': ours_total},
                f, indent=2)
    print(f'wrote {FLAGS.json}')


def _kernel_sizes(variant: str) -> list[int]:
  return [spec[0] for block in models.VGG_SPECS[variant] for spec in block
          if spec != models.LRN]


if __name__ == '__main__':
  app.run(main)
