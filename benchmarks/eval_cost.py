"""Cost per image of the paper's two test methods (Sec. 3.2): dense vs multi-crop evaluation.

Sec. 3.2 argues that dense evaluation (the whole image rescaled to Q, and its flip, run
fully-convolutionally) is cheaper than multi-crop evaluation (a 5 x 5 grid of training-size
crops and their flips, 50 passes of the net per image), since the crops overlap and recompute
the same features. This measures that cost as `vgg_jax.evaluation` implements it: each
method's device step (`dense_posteriors`, `multicrop_posteriors`), jitted on one device, on a
batch of random uint8 images of one synthetic shape (Q x aspect * Q, the long side rounded up
to a multiple of 32) and random parameters. The inputs are already on the device: host
decoding, rescaling and cropping are not timed. The two methods take turns, one timed run
each, so the time ratio is measured side by side.

FLOPs are the model's, counted from Table 1 (`vgg_jax.summary`: 2 per multiply-add, the dense
net over the padded image, fc6 as a convolution): XLA's cost analysis, printed beside them,
does not count the Winograd convolutions' C++ custom calls (`config.conv_algorithm`), so on a
CPU it misses most of the work.

  python -m benchmarks.eval_cost --variant=D --q=384 --batch=8 --dtype=bfloat16
  python -m benchmarks.eval_cost --smoke  # Tiny settings, seconds on a CPU.

No tensorflow: runs unchanged on an accelerator image that lacks it.
"""

import json
import math
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import evaluation
from vgg_jax import models
from vgg_jax import preprocess
from vgg_jax import protocol
from vgg_jax import summary

FLAGS = flags.FLAGS
flags.DEFINE_enum('variant', 'D', list(models.VARIANTS), 'VGG configuration (Table 1).')
flags.DEFINE_float('width', 1.0, 'Channel multiplier; 1.0 is the paper\'s net.')
flags.DEFINE_integer('image_size', 224, 'Training crop size: multi-crop crops, fc6 grid.')
flags.DEFINE_integer('q', 384, 'Test scale Q: the smallest side of the test image.')
flags.DEFINE_float('aspect', 1.33, 'Long side / short side of the synthetic test image; the '
                   'long side is rounded up to a multiple of 32.')
flags.DEFINE_integer('batch', 2, 'Images per step.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
flags.DEFINE_integer('steps', 5, 'Timed repetitions; the median is reported.')
flags.DEFINE_integer('warmup', 1, 'Untimed runs after compilation.')
flags.DEFINE_integer('num_classes', 1000, 'Width of fc8.')
flags.DEFINE_string('json', None, 'Also write the results as JSON to this path.')
flags.DEFINE_bool('smoke', False, 'Tiny settings for CI: variant A, width 1/16, image_size 32, '
                  'q 48, batch 2, steps 2 (override the flags above).')


def settings() -> dict:
  """The flags in effect, --smoke applied."""
  s = {name: FLAGS[name].value for name in
       ('variant', 'width', 'image_size', 'q', 'aspect', 'batch', 'dtype', 'steps', 'warmup',
        'num_classes')}
  if FLAGS.smoke:
    s.update(variant='A', width=1 / 16, image_size=32, q=48, batch=2, steps=2)
  if s['q'] < s['image_size']:
    raise app.UsageError(f'--q={s["q"]} is smaller than --image_size={s["image_size"]}.')
  if s['image_size'] % models.DOWNSAMPLING:
    raise app.UsageError(f'--image_size must be a multiple of {models.DOWNSAMPLING}.')
  if s['aspect'] < 1 or s['batch'] < 1 or s['steps'] < 1 or s['warmup'] < 0:
    raise app.UsageError('Need --aspect >= 1, --batch >= 1, --steps >= 1, --warmup >= 0.')
  return s


def flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled computation, or None where the backend gives none."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  value = (analysis or {}).get('flops')
  return float(value) if value and value > 0 else None


def time_in_turns(methods: dict, num_steps: int, warmup: int) -> dict:
  """Compiles each {name: (fn, args)}, runs each `warmup` times, then times `num_steps` runs of
  each, the methods taking turns."""
  compiled, results = {}, {}
  for name, (fn, args) in methods.items():
    start = time.perf_counter()
    compiled[name] = jax.jit(fn).lower(*args).compile()
    results[name] = {'compile_s': time.perf_counter() - start, 'all_seconds': [],
                     'xla_flops_per_batch': flops(compiled[name])}
    for _ in range(warmup):
      jax.block_until_ready(compiled[name](*args))
  for _ in range(num_steps):
    for name, (_, args) in methods.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled[name](*args))
      results[name]['all_seconds'].append(time.perf_counter() - start)
  for r in results.values():
    r['seconds_per_batch'] = statistics.median(r['all_seconds'])
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  s = settings()
  model = models.VGG(variant=s['variant'], num_classes=s['num_classes'],
                     dtype=models.DTYPES[s['dtype']], width=s['width'])
  normalization = preprocess.Normalization()  # The paper's; it does not change the cost.
  device = jax.devices()[0]

  dummy = jnp.zeros((1, s['image_size'], s['image_size'], 3), jnp.float32)
  params = jax.jit(lambda r: model.init(r, dummy, train=False))(jax.random.PRNGKey(0))['params']
  params = jax.device_put(params, device)

  # One synthetic test image shape: Q x long, padded as the test pipeline pads (bottom/right).
  q, size, batch = s['q'], s['image_size'], s['batch']
  step = models.DOWNSAMPLING
  long = protocol.round_up(math.ceil(s['aspect'] * q - 1e-9), step)
  padded = (protocol.round_up(q, step), long)
  rng = np.random.default_rng(0)
  images = np.zeros((batch, *padded, 3), np.uint8)
  images[:, :q, :long] = rng.integers(0, 256, (batch, q, long, 3), np.uint8)
  sizes = np.tile(np.array([[q, long]], np.int32), (batch, 1))
  # Sec. 3.2's 5 x 5 grid of training-size crops of the same images (flips made on device).
  crops = np.stack([images[:, top:top + size, left:left + size]
                    for top in protocol.crop_offsets(q, size)
                    for left in protocol.crop_offsets(long, size)], axis=1)

  dense = lambda p, x, hw: evaluation.dense_posteriors(p, x, hw, model=model,
                                                        normalization=normalization)
  multicrop = lambda p, x: evaluation.multicrop_posteriors(p, x, model=model,
                                                           normalization=normalization)
  methods = {
      protocol.DENSE: (dense, (params, *jax.device_put((images, sizes), device))),
      protocol.MULTICROP: (multicrop, (params, jax.device_put(crops, device))),
  }
  net = (s['variant'], size, s['width'], s['num_classes'])
  views = {protocol.DENSE: 2, protocol.MULTICROP: 2 * protocol.CROP_GRID ** 2}
  macs_per_view = {protocol.DENSE: summary.dense_macs(s['variant'], padded, *net[1:]),
                   protocol.MULTICROP: summary.totals(*net)['macs']}
  results = time_in_turns(methods, s['steps'], s['warmup'])
  for name, r in results.items():
    per_image = r['seconds_per_batch'] / batch
    r.update(views_per_image=views[name], ms_per_image=1e3 * per_image,
             images_per_s=1.0 / per_image,
             gflops_per_image=2 * views[name] * macs_per_view[name] / 1e9,
             xla_gflops_per_image=(r['xla_flops_per_batch'] / batch / 1e9
                                   if r['xla_flops_per_batch'] else None))
  ratio = results[protocol.MULTICROP]['ms_per_image'] / results[protocol.DENSE]['ms_per_image']
  flops_ratio = (results[protocol.MULTICROP]['gflops_per_image'] /
                 results[protocol.DENSE]['gflops_per_image'])

  command = ' '.join(['python -m benchmarks.eval_cost', *sys.argv[1:]])
  print(f'command: {command}')
  print(f'jax {jax.__version__}, device: {device.platform} {device.device_kind}')
  print(f'net {s["variant"]} width {s["width"]:g} {s["dtype"]}, training size {size}, '
        f'Q = {q}: test image {q}x{long} (padded {padded[0]}x{padded[1]}), batch {batch}, '
        f'median of {s["steps"]} after {s["warmup"]} warm-up')
  header = (f'{"method":<10} {"views/img":>9} {"s/batch":>9} {"ms/img":>9} {"img/s":>9} '
            f'{"GFLOP/img":>10} {"XLA GFLOP":>10} {"compile s":>9}')
  print(header)
  print('-' * len(header))
  for name, r in results.items():
    xla = f'{r["xla_gflops_per_image"]:.2f}' if r['xla_gflops_per_image'] else 'n/a'
    print(f'{name:<10} {r["views_per_image"]:>9} {r["seconds_per_batch"]:>9.4f} '
          f'{r["ms_per_image"]:>9.2f} {r["images_per_s"]:>9.2f} '
          f'{r["gflops_per_image"]:>10.2f} {xla:>10} {r["compile_s"]:>9.1f}')
  print(f'multicrop / dense cost per image: {ratio:.2f}x time, {flops_ratio:.2f}x FLOPs')

  if FLAGS.json:
    report = {'command': command, 'jax_version': jax.__version__,
              'platform': device.platform, 'device_kind': device.device_kind,
              'settings': s, 'image_valid_shape': [q, long], 'image_padded_shape': list(padded),
              'results': results, 'multicrop_over_dense_time': ratio,
              'multicrop_over_dense_flops': flops_ratio}
    with open(FLAGS.json, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'wrote {FLAGS.json}')


if __name__ == '__main__':
  app.run(main)
