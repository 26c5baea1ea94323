"""Inference throughput of vgg_jax's notebook API against torchvision's VGG, same run, in turns.

vgg_jax's side is what a notebook calls: `vgg_jax.features` (the standard forward, fc8 scores
and fc7 features of a batch of preprocessed images) and `vgg_jax.predict` (dense scoring of
one image of the crop's size), with each config.conv_algorithm of --conv_algorithms (the first
is compared with torch). PyTorch's side is
torchvision's twin net in eval mode under `torch.no_grad()`, channels_last, eager and with
torch.compile (every mode tried is reported; the ratio is taken against the fastest). Both see
the same float32 batch; the frameworks take turns of --block calls (`timing.in_turns`).

  python -m benchmarks.inference --variant=D --image_size=224 --batches=1,8
  python -m benchmarks.inference --smoke  # Seconds, for CI.

No tensorflow is imported.
"""

import json
import os
import traceback

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from vgg_jax import inference
from vgg_jax import models
from vgg_jax import preprocess
from vgg_jax import steps

FLAGS = flags.FLAGS
flags.DEFINE_enum('variant', 'D', list(timing.TORCHVISION), 'Net of Table 1 with a '
                  'torchvision twin.')
flags.DEFINE_integer('image_size', 224, 'Input size.')
flags.DEFINE_list('batches', ['1', '8'], 'Images per call.')
flags.DEFINE_integer('steps', 10, 'Timed calls per candidate; the median is reported.')
flags.DEFINE_integer('warmup', 2, 'Untimed calls after compilation.')
flags.DEFINE_integer('block', 2, 'Timed calls per turn.')
flags.DEFINE_enum('torch_compile', 'on', ['on', 'off'], 'Also time torch.compile.')
flags.DEFINE_list('conv_algorithms', ['auto', 'xla'], "vgg_jax's config.conv_algorithm "
                  'settings to time; the first is the one compared with torch.')
flags.DEFINE_string('json', None, 'Also write the results as JSON to this path.')
flags.DEFINE_bool('smoke', False, 'CI settings: net A at 1/8 width, 32x32, batch 1, vgg_jax only.')


def prepare_jax(variant: str, width: float, size: int, batch: int, num_classes: int,
                conv_algorithm: str = 'auto', suffix: str = '') -> dict:
  model = models.VGG(variant=variant, width=width, num_classes=num_classes,
                     conv_algorithm=conv_algorithm)
  x = jnp.asarray(np.random.default_rng(0).normal(0, 50, (batch, size, size, 3)), jnp.float32)
  variables = {'params': steps.init_params(model, jax.random.key(0), x[:1])}
  image = np.random.default_rng(1).integers(0, 256, (size, size, 3), np.uint8)
  # The paper's mean RGB; Q = the image's size, so predict's rescale leaves it as it is.
  at_q = inference.InputTransform(preprocess.Normalization(), size, size)

  def features():
    jax.block_until_ready(inference.features(model, variables, x, layers=('fc7', 'fc8')))

  def predict_one():  # One image already rescaled to Q.
    inference.predict(model, variables, image, at_q)

  return {f'vgg_jax features{suffix}': (features, batch)} | (
      {f'vgg_jax predict (dense){suffix}': (predict_one, 1)} if batch == 1 else {})


def prepare_torch(variant: str, size: int, batch: int, compiled: bool):
  import torch  # pylint: disable=g-import-not-at-top
  model = timing.torchvision_twin(variant, size).eval()
  forward = torch.compile(model) if compiled else model
  x = torch.from_numpy(np.random.default_rng(0).normal(0, 50, (batch, size, size, 3))
                       .astype(np.float32)).permute(0, 3, 1, 2)

  def call():
    with torch.no_grad():
      forward(x)

  return call


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  variant, size, width, num_classes = FLAGS.variant, FLAGS.image_size, 1.0, 1000
  batches, num_steps, warmup, block = [int(b) for b in FLAGS.batches], FLAGS.steps, \
      FLAGS.warmup, FLAGS.block
  versions = {'jax': jax.__version__, **timing.torch_versions()}
  run_torch = 'torch' in versions and not FLAGS.smoke
  if FLAGS.smoke:
    variant, size, width, num_classes, batches = 'A', 32, 0.125, 10, [1]
    num_steps, warmup, block = 2, 1, 1
  if not run_torch:
    print('vgg_jax side only (torch not installed, or --smoke).')
  rows = []
  for batch in batches:
    candidates = {}
    for i, algorithm in enumerate(FLAGS.conv_algorithms):
      candidates |= prepare_jax(variant, width, size, batch, num_classes, algorithm,
                                '' if i == 0 else f' [{algorithm}]')
    errors = {}
    if run_torch:
      for compiled in ([False, True] if FLAGS.torch_compile == 'on' else [False]):
        name = f'torch {"compiled" if compiled else "eager"}'
        call = prepare_torch(variant, size, batch, compiled)
        try:
          call()  # torch.compile compiles here; it may fail on this machine: say so.
        except Exception as e:  # pylint: disable=broad-except
          errors[name] = f'{type(e).__name__}: {e}'.splitlines()[0]
          traceback.print_exc()
          continue
        candidates[name] = (call, batch)
    timings = timing.in_turns({n: c for n, (c, _) in candidates.items()}, num_steps,
                                  warmup, block)
    row = {'variant': variant, 'image_size': size, 'batch': batch, 'errors': errors}
    for name, r in timings.items():
      r['images_per_s'] = candidates[name][1] / r['median_step_s']
      row[name] = r
    torch_names = [n for n in timings if n.startswith('torch')]
    if torch_names:
      best = max(torch_names, key=lambda n: row[n]['images_per_s'])
      row['torch_best'] = best
      row['features_over_torch'] = (row['vgg_jax features']['images_per_s'] /
                                    row[best]['images_per_s'])
    rows.append(row)

  print(f'{variant} at {size}x{size}, float32, {jax.local_devices()[0].device_kind}; '
        f'{versions}')
  print(f'{"batch":>5}  {"candidate":<24}{"img/s":>9}{"ms/call":>10}   spread (ms)')
  for row in rows:
    for name in [n for n in row if isinstance(row[n], dict) and 'images_per_s' in row[n]]:
      r = row[name]
      times = [1e3 * t for t in r['step_times_s']]
      print(f'{row["batch"]:>5}  {name:<24}{r["images_per_s"]:>9.2f}'
            f'{1e3 * r["median_step_s"]:>10.1f}   {min(times):.1f}-{max(times):.1f}')
    if 'features_over_torch' in row:
      print(f'{row["batch"]:>5}  vgg_jax features / {row["torch_best"]}: '
            f'{row["features_over_torch"]:.2f}x')
    for name, error in row['errors'].items():
      print(f'{row["batch"]:>5}  {name}: {error}')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'versions': versions, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
