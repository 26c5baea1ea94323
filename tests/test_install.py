"""The package installed the regular way works without the checkout.

`pip install .` (not editable) into a fresh virtual environment, every command then run from a
directory outside the checkout: `python -m vgg_jax.convert` of a Keras VGG16 weight file,
`vgg_jax.load` of its output, and `python -m vgg_jax.summary --variant=D`. What is installed
must hold everything these need (the default config, the ImageNet class names), since neither
`experiments/` nor the checkout's `vgg_jax/` is importable there.

Installing the dependencies afresh would take minutes and the network, so the new environment
sees the current interpreter's site-packages through a .pth file. A .pth line only appends a
directory to sys.path: the .pth files inside that directory, among them the editable install's
`__editable__*.pth`, are not processed, so the checkout stays invisible (asserted below, not
assumed). The source tree is copied first, so the build writes nothing into the checkout and no
stale `build/lib` there can end up in the wheel.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Table 2 of the paper: net D has 138M parameters (1000 classes, biases included); the exact
# count, 138,357,544, is the one ../shared/paper_reference.md gives with it.
TABLE2_PARAMS_D = 138_357_544
IMAGE_SIZE = 32  # Keras' smallest VGG16 input: conv5 is one cell, fc1 reads 512 features.

# What .gitignore keeps out of a clone, anywhere in the tree or at its root.
_IGNORED_ANYWHERE = ('.git', '.venv', '__pycache__', 'build', 'dist', '.pytest_cache')
_IGNORED_AT_ROOT = ('workdirs', 'data', 'tensorflow_datasets', '.whl')


def _ignore(directory, names):
  at_root = os.path.abspath(directory) == REPO
  return [n for n in names if n in _IGNORED_ANYWHERE or n.endswith('.egg-info')
          or (at_root and n in _IGNORED_AT_ROOT)]


def _run(python, args, cwd, env, timeout=300) -> subprocess.CompletedProcess:
  result = subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, (f'{" ".join(args)} exited {result.returncode}:\n'
                                  f'{result.stdout[-2000:]}\n{result.stderr[-4000:]}')
  return result


class Installed:
  """A fresh venv with `pip install <copy of the checkout>` done in it."""

  def __init__(self, root):
    self.root = root
    self.source = str(root / 'source')
    self.env_dir = str(root / 'venv')
    self.cwd = str(root / 'elsewhere')  # Every command runs here, outside the checkout.
    os.makedirs(self.cwd)
    shutil.copytree(REPO, self.source, ignore=_ignore, symlinks=True)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(self.env_dir)
    self.python = os.path.join(self.env_dir, 'bin', 'python')
    # Nothing of the caller's Python set-up (PYTHONPATH above all) reaches the new interpreter.
    self.env = {k: v for k, v in os.environ.items()
                if not k.startswith(('PYTHON', 'PIP_')) and k != 'VIRTUAL_ENV'}
    old_bin = os.path.dirname(sys.executable)
    self.env['PATH'] = os.pathsep.join(
        [os.path.join(self.env_dir, 'bin')] +
        [p for p in os.environ.get('PATH', '').split(os.pathsep) if p and p != old_bin])
    self.env.update(VIRTUAL_ENV=self.env_dir, PYTHONNOUSERSITE='1',
                    PIP_DISABLE_PIP_VERSION_CHECK='1', KERAS_BACKEND='tensorflow')
    self.site_packages = _run(self.python, ['-c', 'import sysconfig; '
                                            'print(sysconfig.get_path("purelib"))'],
                              self.cwd, self.env).stdout.strip()
    assert self.site_packages.startswith(self.env_dir), self.site_packages
    self.dependencies = sorted({sysconfig.get_path('purelib'), sysconfig.get_path('platlib')})
    with open(os.path.join(self.site_packages, '_current_dependencies.pth'), 'w') as f:
      f.write('\n'.join(self.dependencies) + '\n')
    # pip and setuptools come from the current environment too: --no-build-isolation, so the
    # build downloads nothing (--no-index: nor does anything else), --ignore-installed, so
    # pip never looks at (let alone uninstalls) the current environment's editable vgg_jax.
    self.pip_install = _run(self.python, ['-m', 'pip', 'install', '--no-deps', '--no-index',
                                          '--no-build-isolation', '--ignore-installed',
                                          '--no-cache-dir', self.source],
                            self.cwd, self.env, timeout=600)

  def run(self, *args, timeout=300):
    return _run(self.python, list(args), self.cwd, self.env, timeout)


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  return Installed(tmp_path_factory.mktemp('install'))


def test_installed_vgg_jax_is_the_built_copy_and_the_checkout_is_out_of_reach(installed):
  probe = installed.run('-c', '''
import json, sys
import vgg_jax
try:
  import experiments
  experiments_file = getattr(experiments, "__file__", None) or list(experiments.__path__)
except ImportError:
  experiments_file = None
print(json.dumps({"vgg_jax": vgg_jax.__file__, "experiments": experiments_file,
                  "sys_path": sys.path, "meta_path": [repr(f) for f in sys.meta_path],
                  "modules": sorted(sys.modules)}))
''')
  found = json.loads(probe.stdout.strip().splitlines()[-1])
  package = os.path.join(installed.site_packages, 'vgg_jax', '')
  assert found['vgg_jax'].startswith(package), found['vgg_jax']
  assert found['experiments'] is None, found['experiments']
  # The editable install's finder (set up by its __editable__*.pth) is not installed.
  assert not [f for f in found['meta_path'] if 'editable' in f.lower()], found['meta_path']
  assert not [m for m in found['modules'] if 'editable' in m.lower()], found['modules']
  # Under the checkout on sys.path: at most the current environment's site-packages (when it
  # lives there, as .venv does), never the checkout itself.
  in_checkout = {os.path.join(installed.cwd, p) for p in found['sys_path']
                 if os.path.join(installed.cwd, p).startswith(os.path.join(REPO, ''))
                 or os.path.join(installed.cwd, p) == REPO}
  assert in_checkout <= set(installed.dependencies), found['sys_path']
  assert os.path.isfile(os.path.join(package, 'imagenet_classes.txt'))


@pytest.fixture(scope='module')
def keras():
  os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
  import keras as keras_module  # pylint: disable=g-import-not-at-top
  return keras_module


LOAD_SCRIPT = '''
import json, sys
import jax.numpy as jnp
import numpy as np
import vgg_jax
from vgg_jax import winograd
output, images, logits = sys.argv[1:]
model, variables, preprocess = vgg_jax.load(output)
x = preprocess.normalization(jnp.asarray(np.load(images)))
np.save(logits, np.asarray(model.apply(variables, x)))
names = vgg_jax.class_names(output)
print(json.dumps({
    "vgg_jax": vgg_jax.__file__,
    "net": [model.variant, model.num_classes, model.width, preprocess.image_size],
    "params": {layer: {kind: list(np.shape(value)) for kind, value in weights.items()}
               for layer, weights in variables["params"].items()},
    "class_names": [len(names), names[0], names[281]],
    "winograd": [winograd.SOURCE, winograd.unavailable_reason()]}))
'''


def keras_layer_name(name: str) -> str:
  """keras.applications' VGG16 layer names as the paper's: block3_conv2 -> conv3_2, fc1 -> fc6."""
  if match := re.fullmatch(r'block(\d)_conv(\d)', name):
    return f'conv{match.group(1)}_{match.group(2)}'
  return {'fc1': 'fc6', 'fc2': 'fc7', 'predictions': 'fc8'}[name]


def test_keras_vgg16_converted_and_loaded_by_the_installed_package_gives_keras_logits(
    installed, keras, tmp_path):
  keras.utils.set_random_seed(int.from_bytes(os.urandom(4), 'little'))
  net = keras.applications.VGG16(weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                 classifier_activation=None)
  weights = str(tmp_path / 'vgg16.weights.h5')
  net.save_weights(weights)
  rng = np.random.default_rng(int.from_bytes(os.urandom(4), 'little'))
  images = rng.integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  np.save(tmp_path / 'images.npy', images)
  expected = np.asarray(net(keras.applications.vgg16.preprocess_input(
      images.astype(np.float32)), training=False), np.float64)
  expected_params = {keras_layer_name(layer.name): {'kernel': list(layer.kernel.shape),
                                                    'bias': list(layer.bias.shape)}
                     for layer in net.layers if layer.weights}

  output = str(tmp_path / 'converted')
  installed.run('-m', 'vgg_jax.convert', '--source=keras', f'--input={weights}',
                f'--output={output}')
  (installed.root / 'load.py').write_text(LOAD_SCRIPT)
  loaded = installed.run(str(installed.root / 'load.py'), output,
                         str(tmp_path / 'images.npy'), str(tmp_path / 'logits.npy'))
  found = json.loads(loaded.stdout.strip().splitlines()[-1])

  assert found['vgg_jax'].startswith(installed.site_packages), found['vgg_jax']
  assert found['net'] == ['D', 1000, 1.0, IMAGE_SIZE]
  assert found['params'] == expected_params
  # The ImageNet class names are package data of the installed package.
  assert found['class_names'] == [1000, 'n01440764 tench', 'n02123045 tabby']
  # So is the Winograd kernels' C++ source, which conv1_2 and conv2_x run here (>= 32 tiles).
  source, unavailable = found['winograd']
  assert source.startswith(installed.site_packages), source
  if shutil.which('g++'):
    assert unavailable is None
  actual = np.load(tmp_path / 'logits.npy').astype(np.float64)
  assert actual.shape == expected.shape == (2, 1000)
  assert np.max(np.abs(actual - expected)) <= 1e-5 * np.max(np.abs(expected))
  source = json.loads((tmp_path / 'converted' / 'source.json').read_text())
  assert source['source'] == 'keras' and source['variant'] == 'D'


def test_installed_summary_of_net_d_counts_table2s_parameters(installed):
  result = installed.run('-m', 'vgg_jax.summary', '--variant=D')
  total = re.search(r'^\| \*\*total\*\* \| \| \*\*([\d,]+)\*\* \|', result.stdout, re.M)
  assert total, result.stdout
  assert int(total.group(1).replace(',', '')) == TABLE2_PARAMS_D
  assert round(TABLE2_PARAMS_D / 1e6) == 138
  assert result.stdout.count('| conv') == 13 and result.stdout.count('| fc') == 3
