"""Train-step throughput of vgg_jax against torchvision's VGG, same workload, same run.

vgg_jax's side is the real pmapped train step (`steps.pmap_train_step`: colour shift, mean
subtraction, forward, backward, cross-device mean, SGD with momentum and weight decay, the
non-finite guard) on a synthetic uint8 batch already on the device; the input pipeline is
timed separately (`benchmarks.input_pipeline`). PyTorch's side is torchvision's vgg11/13/16/19
(nets A/B/D/E; C and A-LRN have no torchvision twin) doing the same step: the same uint8
batch, colour shift and mean subtraction, cross-entropy, SGD with momentum and weight decay on
the weights; channels_last, bf16 autocast for bfloat16, and torch.compile where it works
(every torch variant tried is reported, and the ratio is taken against the fastest).
torchvision's adaptive average pool is dropped (it is the identity at 224) so both nets see
the same (size/32)^2 x 512 fc6 input at any size.

Each figure is the median of >= 20 step times after warm-up, each step blocked until its
results are ready; the frameworks take turns of --block steps (`in_turns`). Model FLOPs come from `vgg_jax.summary` (6 x multiply-adds per training
image); MFU divides by the device's dense peak where it is known (GPUs).

  python -m benchmarks.train_step --variants=A --image_size=128 --batch=16   # the CPU case
  python -m benchmarks.train_step --variants=A,B,D,E --dtypes=float32,bfloat16 --batch=128
  python -m benchmarks.train_step --smoke  # Seconds, for CI.

No tensorflow is imported: this runs unchanged on accelerator images that lack it.
"""

import json
import os
import sys
import time
import traceback

# Both frameworks share one accelerator here: JAX must not grab 75% of its memory up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import TORCHVISION, in_turns, torch_versions, torchvision_twin
from vgg_jax import models
from vgg_jax import ops
from vgg_jax import preprocess
from vgg_jax import steps
from vgg_jax import summary
from vgg_jax import winograd

FLAGS = flags.FLAGS
flags.DEFINE_list('variants', ['A'], 'Configurations of Table 1.')
flags.DEFINE_list('dtypes', ['float32'], 'Compute dtypes: float32, bfloat16.')
flags.DEFINE_integer('image_size', 224, 'Training crop size.')
flags.DEFINE_integer('batch', 16, 'Images per device per step.')
flags.DEFINE_integer('steps', 20, 'Timed steps; the median is reported.')
flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
flags.DEFINE_integer('block', 5, 'Timed steps per turn: the candidates take turns.')
flags.DEFINE_float('width', 1.0, 'Channel multiplier (vgg_jax only; torch runs only at 1).')
flags.DEFINE_integer('num_classes', 1000, 'Width of fc8.')
flags.DEFINE_list('frameworks', ['jax', 'torch'], 'Which sides to run: jax, torch.')
flags.DEFINE_enum('torch_compile', 'auto', ['auto', 'on', 'off'],
                  'torch.compile: auto tries it on GPUs only (CPU compilation of a VGG takes '
                  'minutes); on tries it everywhere; eager is always measured too.')
flags.DEFINE_bool('ablations', False, 'Also measure, on the vgg_jax side and the first variant '
                  'and dtype, what each train-loop choice buys: buffer donation, metrics '
                  'pulled every N steps, uint8 transfer, prefetch to device, the kernel '
                  'gradient as matmuls.')
flags.DEFINE_list('conv_algorithms', ['auto'], "vgg_jax's config.conv_algorithm settings to "
                  'time (the first with every --weight_grads, the rest with the first of those); '
                  'the first is the one compared with torch.')
flags.DEFINE_list('weight_grads', ['auto'], "vgg_jax's config.weight_grad settings to time, in "
                  "the same turns: auto, conv, matmul. The first is the one compared to torch.")
flags.DEFINE_integer('pull_every', 10, 'Ablations: steps between metric pulls (log_every_steps).')
flags.DEFINE_string('json', None, 'Also write the results as JSON to this path.')
flags.DEFINE_bool('smoke', False, 'CI settings: variant A at 32x32, batch 2, 2 steps, 1 '
                  'warm-up (override the flags above).')

# Dense peak FLOP/s by device kind and dtype (float32 as TF32 tensor-core matmuls, which is
# what XLA's and PyTorch's default GPU precision use for convolutions).
PEAK_FLOPS = {
    'H100': {'bfloat16': 989.4e12, 'float32': 494.7e12},
    'H200': {'bfloat16': 989.4e12, 'float32': 494.7e12},
    'A100': {'bfloat16': 312e12, 'float32': 156e12},
}
MEAN_RGB = (123.68, 116.779, 103.939)
COLOR_SHIFT_STD = 0.1


class Config(dict):
  """The fields `steps` reads, as attributes (no ml_collections needed on GPU images)."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e


def settings() -> dict:
  s = {name: FLAGS[name].value for name in
       ('variants', 'dtypes', 'image_size', 'batch', 'steps', 'warmup', 'block', 'width',
        'num_classes', 'frameworks', 'torch_compile')}
  if FLAGS.smoke:
    s.update(variants=['A'], image_size=32, batch=2, steps=2, warmup=1, block=1, num_classes=10)
  unknown = [v for v in s['variants'] if v not in models.VARIANTS]
  if unknown:
    raise app.UsageError(f'--variants: unknown {unknown}; expected some of {models.VARIANTS}.')
  bad_grads = [w for w in FLAGS.weight_grads if w not in ops.WEIGHT_GRADS]
  if bad_grads:
    raise app.UsageError(f'--weight_grads: unknown {bad_grads}; expected some of '
                         f'{ops.WEIGHT_GRADS}.')
  bad_algorithms = [a for a in FLAGS.conv_algorithms if a not in winograd.CONV_ALGORITHMS]
  if bad_algorithms:
    raise app.UsageError(f'--conv_algorithms: unknown {bad_algorithms}; expected some of '
                         f'{winograd.CONV_ALGORITHMS}.')
  bad = [d for d in s['dtypes'] if d not in ('float32', 'bfloat16')]
  if bad:
    raise app.UsageError(f'--dtypes: unknown {bad}; expected float32 and/or bfloat16.')
  if s['image_size'] % models.DOWNSAMPLING:
    raise app.UsageError(f'--image_size must be a multiple of {models.DOWNSAMPLING}.')
  if s['batch'] < 1 or s['steps'] < 1 or s['warmup'] < 0 or s['block'] < 1:
    raise app.UsageError('Need --batch >= 1, --steps >= 1, --warmup >= 0, --block >= 1.')
  return s


def peak_flops(device_kind: str, dtype: str):
  for name, peaks in PEAK_FLOPS.items():
    if name in device_kind:
      return peaks[dtype]
  return None


def synthetic_batch(batch: int, image_size: int, num_classes: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, image_size, image_size, 3), np.uint8)
  labels = rng.integers(0, num_classes, (batch,), np.int32)
  return images, labels


def jax_config(variant: str, dtype: str, s: dict) -> Config:
  """The paper's settings (default_config's, written out: no ml_collections here)."""
  return Config(variant=variant, num_classes=s['num_classes'], dropout_rate=0.5, dtype=dtype,
                width=s['width'], init='paper', init_std=0.01, init_std_as_full_size=False,
                conv_algorithm='auto', weight_grad='auto', learning_rate=0.01, momentum=0.9,
                sgd_form='caffe', weight_decay=5e-4, frozen_layers='', lr_plateau_factor=0.1,
                lr_plateau_patience=3, lr_max_decreases=3, mean_rgb=MEAN_RGB,
                std_rgb=(1.0, 1.0, 1.0), channel_order='RGB', color_shift_std=COLOR_SHIFT_STD,
                grad_accum_steps=1)


def prepare_jax(variant: str, dtype: str, s: dict, weight_grad: str = 'auto',
                conv_algorithm: str = 'auto'):
  """vgg_jax's pmapped train step over the local devices, `batch` images on each:
  (step function, what is known of it before running)."""
  config = Config(jax_config(variant, dtype, s), weight_grad=weight_grad,
                  conv_algorithm=conv_algorithm)
  devices = jax.local_device_count()
  state = steps.create_train_state(config, jax.random.key(0), s['image_size'])
  images, labels = synthetic_batch(devices * s['batch'], s['image_size'], s['num_classes'])
  batch = jax.device_put({'image': images.reshape(devices, s['batch'], *images.shape[1:]),
                          'label': labels.reshape(devices, s['batch'])},
                         steps.batch_sharding())
  rng = jax.random.key(1)
  p_train_step = steps.pmap_train_step(config)
  memory = None
  try:
    analysis = p_train_step.lower(state, batch, rng).compile().memory_analysis()
    memory = {'temp_bytes': int(analysis.temp_size_in_bytes),
              'argument_bytes': int(analysis.argument_size_in_bytes),
              'output_bytes': int(analysis.output_size_in_bytes),
              'alias_bytes': int(analysis.alias_size_in_bytes)}
  except Exception:  # pylint: disable=broad-except  # Not every backend reports it.
    pass
  holder = [state]

  def step():
    holder[0], metrics = p_train_step(holder[0], batch, rng)
    jax.block_until_ready((holder[0], metrics))

  result = {'images_per_step': devices * s['batch'], 'devices': devices}
  if memory:
    # Temporaries (activations, workspace) grow with the batch; state and batch do not.
    result['memory'] = memory
    result['peak_bytes'] = (memory['temp_bytes'] + memory['argument_bytes'] +
                            memory['output_bytes'] - memory['alias_bytes'])
    result['temp_bytes_per_image'] = memory['temp_bytes'] / s['batch']
  return step, result


def jax_device_peak() -> dict:
  stats = jax.local_devices()[0].memory_stats() or {}
  return ({'device_peak_bytes_in_use': int(stats['peak_bytes_in_use'])}
          if 'peak_bytes_in_use' in stats else {})


def loop_rate(config: Config, s: dict, *, donate: bool = True, pull_every: int = 0,
              prefetch: bool = True, input_dtype=np.uint8,
              check_each_step: bool = True) -> float:
  """Images/s of a training loop fed from host numpy batches, as `train.py` runs it.

  pull_every=0 pulls the metrics to the host after every step (a host sync per step);
  otherwise every `pull_every` steps. check_each_step reads the previous step's non-finite
  flag each step (`train.TrainMetrics`). prefetch=False puts each batch on the devices just
  before its step instead of `steps.prefetch_to_device`'s two ahead. A float32
  input_dtype sends the batch as float32 (4x the bytes), cast back to uint8 values.
  """
  devices = jax.local_device_count()
  config = Config(config, grad_accum_steps=1)
  state = steps.create_train_state(config, jax.random.key(0), s['image_size'])
  p_train_step = steps.pmap_train_step(config, donate=donate)
  host_batches = []
  for seed in range(4):
    images, labels = synthetic_batch(devices * s['batch'], s['image_size'], s['num_classes'],
                                     seed)
    host_batches.append({'image': images.astype(input_dtype).reshape(
        devices, s['batch'], *images.shape[1:]), 'label': labels.reshape(devices, s['batch'])})
  num_steps = s['warmup'] + s['steps']

  def batches():
    for i in range(num_steps):
      yield host_batches[i % len(host_batches)]

  stream = steps.prefetch_to_device(batches()) if prefetch else (
      jax.device_put(b, steps.batch_sharding()) for b in batches())
  rng, pending, start = jax.random.key(1), [], None
  for i, batch in enumerate(stream):
    if input_dtype != np.uint8:
      batch = dict(batch, image=batch['image'].astype(jnp.uint8))
    state, metrics = p_train_step(state, batch, rng)
    if check_each_step and pending:
      float(pending[-1]['nonfinite'])
    pending.append(metrics)
    if i + 1 == s['warmup']:
      jax.block_until_ready((state, pending))
      pending, start = [], time.perf_counter()
    elif pull_every == 0 or len(pending) >= pull_every:
      jax.device_get(pending)
      pending = []
  jax.device_get(pending)
  jax.block_until_ready(state)
  return s['steps'] * devices * s['batch'] / (time.perf_counter() - start)


def ablations(variant: str, dtype: str, s: dict) -> dict:
  """Each train-loop choice against its alternative, the rest as train.py has it."""
  config = jax_config(variant, dtype, s)
  out = {}
  for name, kwargs in (('train.py loop', {'pull_every': FLAGS.pull_every}),
                       ('metrics pulled every step', {'pull_every': 0}),
                       ('non-finite flag read only with the metrics',
                        {'pull_every': FLAGS.pull_every, 'check_each_step': False}),
                       ('no prefetch to device', {'pull_every': FLAGS.pull_every,
                                                  'prefetch': False}),
                       ('float32 transfer', {'pull_every': FLAGS.pull_every,
                                             'input_dtype': np.float32}),
                       ('no donation', {'pull_every': FLAGS.pull_every, 'donate': False})):
    out[name] = {'images_per_s': loop_rate(config, s, **kwargs)}
  out['kernel gradient as XLA convolution'] = {'images_per_s': loop_rate(
      Config(config, weight_grad='conv'), s, pull_every=FLAGS.pull_every)}
  # Memory: what donation saves, from XLA's own accounting of the compiled step.
  devices = jax.local_device_count()
  state = steps.create_train_state(config, jax.random.key(0), s['image_size'])
  images, labels = synthetic_batch(devices * s['batch'], s['image_size'], s['num_classes'])
  batch = {'image': images.reshape(devices, s['batch'], *images.shape[1:]),
           'label': labels.reshape(devices, s['batch'])}
  out['peak_bytes'] = {}
  for donate in (True, False):
    try:
      analysis = steps.pmap_train_step(config, donate=donate).lower(
          state, batch, jax.random.key(1)).compile().memory_analysis()
      out['peak_bytes']['donated' if donate else 'not donated'] = int(
          analysis.temp_size_in_bytes + analysis.argument_size_in_bytes +
          analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
    except Exception:  # pylint: disable=broad-except  # Not every backend reports it.
      pass
  out['batch_bytes'] = {'uint8': int(images.nbytes), 'float32': int(images.nbytes * 4)}
  return out


def torch_modes(device_type: str, compile_flag: str) -> list[bool]:
  """Which torch.compile settings to try: eager always, compiled where asked or on GPUs."""
  if compile_flag == 'on' or (compile_flag == 'auto' and device_type == 'cuda'):
    return [False, True]
  return [False]


def prepare_torch(variant: str, dtype: str, s: dict, compiled: bool):
  """torchvision's twin of `variant` doing the same train step on the same batch:
  (step function, what is known of it before running)."""
  import torch  # pylint: disable=g-import-not-at-top
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  model = torchvision_twin(variant, s['image_size'], s['num_classes']).to(device).train()
  weights = [p for n, p in model.named_parameters() if not n.endswith('bias')]
  biases = [p for n, p in model.named_parameters() if n.endswith('bias')]
  optimizer = torch.optim.SGD([{'params': weights, 'weight_decay': 5e-4},
                               {'params': biases, 'weight_decay': 0.0}], lr=0.01, momentum=0.9)
  forward = torch.compile(model) if compiled else model
  images, labels = synthetic_batch(s['batch'], s['image_size'], s['num_classes'])
  # NHWC uint8, as vgg_jax's batches arrive; permuted to NCHW it is channels_last in memory.
  images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)
  labels = torch.from_numpy(labels).long().to(device)
  mean = torch.tensor(MEAN_RGB, device=device).view(1, 3, 1, 1)
  eigval = torch.from_numpy(preprocess.PCA_EIGVAL).to(device)
  eigvec = torch.from_numpy(preprocess.PCA_EIGVEC).to(device)
  amp = dtype == 'bfloat16'

  def step():
    alpha = COLOR_SHIFT_STD * torch.randn(images.shape[0], 3, device=device)
    shift = 255.0 * (alpha * eigval) @ eigvec.T
    x = images.float() - mean + shift[:, :, None, None]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
      logits = forward(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device.type == 'cuda':
      torch.cuda.synchronize()

  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  return step, {'images_per_step': s['batch'], 'devices': 1, 'threads': torch.get_num_threads()}


def torch_device_peak() -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  if not torch.cuda.is_available():
    return {}
  peak = {'device_peak_bytes_in_use': int(torch.cuda.max_memory_allocated())}
  torch.cuda.reset_peak_memory_stats()
  return peak


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  s = settings()
  device = jax.local_devices()[0]
  versions = {'jax': jax.__version__, 'jaxlib': jax.lib.__version__ if hasattr(jax, 'lib')
              else None, **torch_versions()}
  run_torch_side = 'torch' in s['frameworks'] and 'torch' in versions
  if 'torch' in s['frameworks'] and not run_torch_side:
    print('torch/torchvision not installed: vgg_jax side only.')
  if run_torch_side and s['width'] != 1.0:
    print('--width != 1: torchvision has only the full-width nets; vgg_jax side only.')
    run_torch_side = False
  device_type = 'cuda' if versions.get('device', 'cpu') != 'cpu' else 'cpu'

  rows = []
  for variant in s['variants']:
    flops = summary.train_flops_per_image(variant, s['image_size'], s['width'],
                                          s['num_classes'])
    for dtype in s['dtypes']:
      row = {'variant': variant, 'dtype': dtype, 'train_flops_per_image': flops}
      candidates, infos, peaks = {}, {}, {}
      if 'jax' in s['frameworks']:
        settings_ = [(w, FLAGS.conv_algorithms[0]) for w in FLAGS.weight_grads]
        settings_ += [(FLAGS.weight_grads[0], a) for a in FLAGS.conv_algorithms[1:]]
        for i, (weight_grad, algorithm) in enumerate(settings_):
          name = ('jax' if i == 0 else f'jax weight_grad={weight_grad}'
                  if i < len(FLAGS.weight_grads) else f'jax conv_algorithm={algorithm}')
          candidates[name], infos[name] = prepare_jax(variant, dtype, s, weight_grad, algorithm)
          peaks[name] = jax_device_peak
      if run_torch_side and variant in TORCHVISION:
        row['torch'] = {}
        for compiled in torch_modes(device_type, s['torch_compile']):
          name = 'compiled' if compiled else 'eager'
          step, info = prepare_torch(variant, dtype, s, compiled)
          try:  # torch.compile may not work here: its first call says so.
            step()
          except Exception as e:  # pylint: disable=broad-except
            row['torch'][name] = {'error': f'{type(e).__name__}: {e}'.splitlines()[0],
                                  'traceback': traceback.format_exc()[-2000:]}
            continue
          candidates[f'torch {name}'], infos[f'torch {name}'] = step, info
          peaks[f'torch {name}'] = torch_device_peak
      timings = in_turns(candidates, s['steps'], s['warmup'], s['block'])
      for name, r in timings.items():
        r = {**infos[name], **r, **peaks[name]()}
        r['images_per_s'] = r['images_per_step'] / r['median_step_s']
        r['tflops_per_s'] = flops * r['images_per_s'] / 1e12
        if name.startswith('jax'):
          peak = peak_flops(device.device_kind, dtype)
          r['mfu'] = flops * r['images_per_s'] / (peak * r['devices']) if peak else None
          if name == 'jax':
            row['jax'] = r
          else:
            row.setdefault('jax_settings', {})[name.split()[1]] = r
        else:
          row['torch'][name.split()[1]] = r
      ok = {k: v for k, v in row.get('torch', {}).items() if 'images_per_s' in v}
      if ok:
        row['torch_best'] = max(ok, key=lambda k: ok[k]['images_per_s'])
        if 'jax' in row:
          row['jax_over_torch'] = (row['jax']['images_per_s'] /
                                   ok[row['torch_best']]['images_per_s'])
      rows.append(row)
  if FLAGS.ablations and 'jax' in s['frameworks']:
    rows[0]['ablations'] = ablations(s['variants'][0], s['dtypes'][0], s)

  command = ' '.join(['python -m benchmarks.train_step', *sys.argv[1:]])
  print(f'command: {command}')
  print(f'versions: {versions}; jax device: {device.platform} {device.device_kind} x '
        f'{jax.local_device_count()}; {os.cpu_count()} CPU cores')
  print(f'{s["image_size"]}x{s["image_size"]}, batch {s["batch"]} per device, width '
        f'{s["width"]:g}, median of {s["steps"]} steps after {s["warmup"]} warm-up, in turns of '
        f'{s["block"]}')
  header = (f'{"net":<6}{"dtype":<9}{"GFLOP/img":>10}{"jax img/s":>11}{"TFLOP/s":>9}'
            f'{"MFU":>7}{"MiB/img":>9}{"torch img/s":>13}{"torch mode":>12}{"jax/torch":>10}')
  print(header)
  print('-' * len(header))
  for row in rows:
    j = row.get('jax', {})
    t = row.get('torch', {}).get(row.get('torch_best'), {})
    mfu = f'{100 * j["mfu"]:.1f}%' if j.get('mfu') else 'n/a'
    mem = (f'{j["temp_bytes_per_image"] / 2**20:.1f}' if j.get('temp_bytes_per_image')
           else 'n/a')
    print(f'{row["variant"]:<6}{row["dtype"]:<9}{row["train_flops_per_image"] / 1e9:>10.2f}'
          f'{j.get("images_per_s", float("nan")):>11.1f}'
          f'{j.get("tflops_per_s", float("nan")):>9.3f}{mfu:>7}{mem:>9}'
          f'{t.get("images_per_s", float("nan")):>13.1f}{row.get("torch_best", "-"):>12}'
          f'{row.get("jax_over_torch", float("nan")):>10.2f}')
    for setting, r in row.get('jax_settings', {}).items():
      print(f"  vgg_jax with {setting}: {r['images_per_s']:.1f} img/s; weight_grad="
            f"{FLAGS.weight_grads[0]}, conv_algorithm={FLAGS.conv_algorithms[0]} is "
            f"{j['images_per_s'] / r['images_per_s']:.2f}x that")
    for name, r in row.get('torch', {}).items():
      if 'error' in r:
        print(f'  torch {name} failed: {r["error"]}')
  if 'ablations' in rows[0]:
    a = rows[0]['ablations']
    base = a['train.py loop']['images_per_s']
    print(f'train-loop ablations, net {rows[0]["variant"]} {rows[0]["dtype"]} (img/s, vs '
          f'train.py\'s loop):')
    for name, r in a.items():
      if 'images_per_s' in r:
        print(f'  {name:<38}{r["images_per_s"]:>9.2f}{r["images_per_s"] / base:>8.2f}x')
    for name, value in a.get('peak_bytes', {}).items():
      print(f'  peak bytes, state {name:<21}{value / 2**20:>9.1f} MiB')
    print(f'  bytes per batch sent: uint8 {a["batch_bytes"]["uint8"]:,}, float32 '
          f'{a["batch_bytes"]["float32"]:,}')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'command': command, 'versions': versions, 'platform': device.platform,
                 'device_kind': device.device_kind, 'cpu_count': os.cpu_count(),
                 'xla_flags': os.environ.get('XLA_FLAGS', ''), 'settings': s,
                 'results': rows}, f, indent=2)
    print(f'wrote {FLAGS.json}')


if __name__ == '__main__':
  app.run(main)
