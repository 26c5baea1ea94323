r"""F(4x4, 3x3) Winograd convolutions with the transforms in C++ (XLA FFI custom calls): an
experiment for issue 17, not part of vgg_jax.

`benchmarks/winograd.py` found that Winograd's batched matmuls beat oneDNN's convolutions on
the CPU, but that XLA runs the transforms as slow memory-bound passes. Here the transforms
are C++ kernels (`winograd_ffi.cc`: each 6x6 tile transformed in registers, vectorised over
channels, borders handled in place), and the batched matmul (batch 36) stays XLA's. The
library is compiled with g++ on first use into the system's temporary folder.

  python -m benchmarks.winograd_ffi --variant=D --image_size=224 --batch=8

checks every layer's forward, input gradient and kernel gradient against XLA's convolution
(max |diff| / max |XLA| in float32, batch 2), then times in turns: the convolutions and pools
as one jit (XLA's convolutions or Winograd's), the whole net as one jit (fc6-fc8 included),
the Winograd convolutions and the fully-connected head as two jits, and torchvision's net in
eval mode (channels_last, no_grad). conv1_1 (3 input channels) keeps XLA's convolution.
"""

import ctypes
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks import winograd
from benchmarks.winograd import layer_shapes
from vgg_jax import models
from vgg_jax import ops

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'winograd_ffi.cc')
TARGETS = {'wino_input': 'WinoInput', 'wino_output': 'WinoOutput',
           'wino_output_t': 'WinoOutputT', 'wino_input_t': 'WinoInputT',
           'wino_kernel': 'WinoKernel', 'wino_kernel_t': 'WinoKernelT'}
# (layer, forward / dx / dw): float32 F(4x4, 3x3) errors measured 2e-6 to 2.3e-5.
TOLERANCE = 1e-4

# --variant, --image_size, --batch, --steps, --json and --smoke are benchmarks.winograd's.
FLAGS = flags.FLAGS


@functools.cache
def load() -> str:
  """Compiles winograd_ffi.cc (once per source and jaxlib) and registers its targets."""
  if shutil.which('g++') is None:
    raise RuntimeError('benchmarks.winograd_ffi needs g++ to compile winograd_ffi.cc.')
  with open(SOURCE, 'rb') as f:
    key = hashlib.sha256(f.read() + jax.__version__.encode()).hexdigest()[:16]
  folder = os.path.join(tempfile.gettempdir(), 'vgg_jax_winograd_ffi')
  library = os.path.join(folder, f'winograd_ffi_{key}.so')
  if not os.path.exists(library):
    os.makedirs(folder, exist_ok=True)
    partial = f'{library}.{os.getpid()}'
    subprocess.run(['g++', '-O3', '-march=native', '-shared', '-fPIC', '-std=c++17',
                    '-w', f'-I{jax.ffi.include_dir()}', SOURCE, '-o', partial],
                   check=True)
    os.replace(partial, library)
  lib = ctypes.cdll.LoadLibrary(library)
  for name, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  return library


def _tiles(n, h, w):
  return n * -(-h // 4) * -(-w // 4)


def input_transform(x):
  """x[N,H,W,C] -> V[36, tiles, C]: B^T d B of every 6x6 input tile (stride 4, pad 1)."""
  n, h, w, c = x.shape
  return jax.ffi.ffi_call('wino_input', jax.ShapeDtypeStruct((36, _tiles(n, h, w), c),
                                                             jnp.float32))(x)


def output_transform(m, shape, bias=None, relu=False):
  """M[36, tiles, K] -> y[shape]: A^T m A of every tile, cropped, (+ bias) (ReLU)."""
  mode = 0 if bias is None else (2 if relu else 1)
  if bias is None:
    bias = jnp.zeros((m.shape[-1],), jnp.float32)
  return jax.ffi.ffi_call('wino_output', jax.ShapeDtypeStruct(shape, jnp.float32))(
      m, bias, mode=np.int32(mode))


def output_transform_t(dy):
  n, h, w, k = dy.shape
  return jax.ffi.ffi_call('wino_output_t', jax.ShapeDtypeStruct(
      (36, _tiles(n, h, w), k), jnp.float32))(dy, dy, mode=np.int32(0))


def input_transform_t(dv, shape):
  return jax.ffi.ffi_call('wino_input_t', jax.ShapeDtypeStruct(shape, jnp.float32))(dv)


def kernel_transform(kernel):
  """HWIO (3, 3, C, K) -> U[36, C, K] = G g G^T."""
  return jax.ffi.ffi_call('wino_kernel', jax.ShapeDtypeStruct((36, *kernel.shape[2:]),
                                                              jnp.float32))(kernel)


def kernel_transform_t(du):
  return jax.ffi.ffi_call('wino_kernel_t', jax.ShapeDtypeStruct((3, 3, *du.shape[1:]),
                                                                jnp.float32))(du)


def _matmul(v, u):
  return jnp.einsum('epc,ecf->epf', v, u)


@jax.custom_vjp
def conv(x, kernel):
  """A 3x3, stride-1, SAME convolution (NHWC, HWIO) by F(4x4, 3x3)."""
  n, h, w, _ = x.shape
  return output_transform(_matmul(input_transform(x), kernel_transform(kernel)),
                          (n, h, w, kernel.shape[-1]))


def _conv_fwd(x, kernel):
  v, u = input_transform(x), kernel_transform(kernel)
  n, h, w, _ = x.shape
  return output_transform(_matmul(v, u), (n, h, w, kernel.shape[-1])), (v, u, x.shape)


def _conv_bwd(residuals, dy):
  """Both gradients in the Winograd domain: dV = dM U^T, dU = V^T dM."""
  v, u, x_shape = residuals
  dm = output_transform_t(dy)
  dx = input_transform_t(jnp.einsum('epf,ecf->epc', dm, u), x_shape)
  return dx, kernel_transform_t(jnp.einsum('epc,epf->ecf', v, dm))


conv.defvjp(_conv_fwd, _conv_bwd)


def conv_bias_relu(x, kernel, bias):
  """relu(conv(x) + bias), the bias and ReLU applied in the output transform (forward only)."""
  n, h, w, _ = x.shape
  m = _matmul(input_transform(x), kernel_transform(kernel))
  return output_transform(m, (n, h, w, kernel.shape[-1]), bias, relu=True)


def xla_conv_bias_relu(x, kernel, bias):
  return jax.nn.relu(ops.conv(x, kernel) + bias)


def init(rng, shapes, image_size, width, num_classes):
  convs = [(rng.normal(0, (9 * c) ** -0.5 * 1.4, (3, 3, c, k)).astype(np.float32),
            rng.normal(0, 0.01, (k,)).astype(np.float32)) for _, _, c, k in shapes]
  fc = models.scaled(models.FC_WIDTH, width)
  fan_in = (image_size // models.DOWNSAMPLING) ** 2 * shapes[-1][3]
  fcs = [(rng.normal(0, a ** -0.5, (a, b)).astype(np.float32), np.zeros(b, np.float32))
         for a, b in ((fan_in, fc), (fc, fc), (fc, num_classes))]
  return jax.device_put(convs), jax.device_put(fcs)


def convolutions(convs, x, variant, winograd):
  """Every conv + bias + ReLU and max-pool of `variant`; conv1_1 on XLA's convolution."""
  i = 0
  for specs in models.VGG_SPECS[variant]:
    for spec in specs:
      if spec == models.LRN:
        continue
      kernel, bias = convs[i]
      layer = conv_bias_relu if winograd and i > 0 else xla_conv_bias_relu
      x = layer(x, kernel, bias)
      i += 1
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).max((2, 4))
  return x


def head(fcs, x):
  x = x.reshape(x.shape[0], -1)
  for j, (w, b) in enumerate(fcs):
    x = x @ w + b
    x = jax.nn.relu(x) if j < 2 else x
  return x


def check(shapes, rng) -> dict:
  """Per layer: max |Winograd - XLA| / max |XLA| of y, dx and dw (batch 2, float32)."""
  errors = {}
  for name, side, c, k in shapes:
    x = jnp.asarray(rng.normal(0, 1, (2, side, side, c)), jnp.float32)
    kernel = jnp.asarray(rng.normal(0, (9 * c) ** -0.5, (3, 3, c, k)), jnp.float32)
    dy = jnp.asarray(rng.normal(0, 1, (2, side, side, k)), jnp.float32)
    outs = []
    for f in (conv, ops.conv):
      y, vjp = jax.jit(lambda x, w, f=f: jax.vjp(f, x, w))(x, kernel)
      outs.append((y, *vjp(dy)))
    errors[name] = {part: float(jnp.abs(a - b).max() / jnp.abs(b).max())
                    for part, a, b in zip(('y', 'dx', 'dw'), *outs)}
  return errors


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  variant, size, batch, width, steps = winograd.settings()
  load()
  shapes = layer_shapes(variant, size, width)
  rng = np.random.default_rng(0)
  errors = check(shapes, rng)
  for name, e in errors.items():
    print(f'{name}: y {e["y"]:.1e}  dx {e["dx"]:.1e}  dw {e["dw"]:.1e}')

  convs, fcs = init(rng, shapes, size, width, 1000)
  x = jnp.asarray(rng.normal(0, 50, (batch, size, size, 3)), jnp.float32)

  def jitted(f, *args):
    g = jax.jit(f)
    return lambda: jax.block_until_ready(g(*args))

  xla_convs = jax.jit(lambda p, x: convolutions(p, x, variant, False))
  wino_convs = jax.jit(lambda p, x: convolutions(p, x, variant, True))
  jit_head = jax.jit(head)
  candidates = {
      'convolutions, XLA (one jit)': jitted(xla_convs, convs, x),
      'convolutions, Winograd (one jit)': jitted(wino_convs, convs, x),
      'net, XLA (one jit)':
          jitted(lambda c, f, x: head(f, convolutions(c, x, variant, False)), convs, fcs, x),
      'net, Winograd (one jit)':
          jitted(lambda c, f, x: head(f, convolutions(c, x, variant, True)), convs, fcs, x),
      'net, Winograd convolutions + head (two jits)':
          lambda: jax.block_until_ready(jit_head(fcs, wino_convs(convs, x))),
  }
  versions = {'jax': jax.__version__, **timing.torch_versions()}
  if 'torch' in versions and not FLAGS.smoke:
    import torch  # pylint: disable=g-import-not-at-top
    model = timing.torchvision_twin(variant, size).eval()
    x_torch = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)

    def torch_call():
      with torch.no_grad():
        model(x_torch)

    candidates['net, torchvision eager (channels_last)'] = torch_call
  results = timing.in_turns(candidates, steps, warmup=1 if not FLAGS.smoke else 0, block=1)
  print(f'{variant} at {size}, batch {batch}, width {width:g}, float32, ms per forward '
        f'(median [min - max] of {steps}, in turns):')
  for name, r in results.items():
    t = [1e3 * s for s in r['step_times_s']]
    print(f'  {name:48s} {1e3 * r["median_step_s"]:8.0f}  [{min(t):.0f} - {max(t):.0f}]')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'errors': errors, 'timings': results, 'versions': versions,
                 'setting': {'variant': variant, 'image_size': size, 'batch': batch,
                             'width': width}}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
