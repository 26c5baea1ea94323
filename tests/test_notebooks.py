"""notebooks/ execute top to bottom on a freshly trained digits net, within two minutes."""

import os
import re
import time

import nbformat
from nbclient import NotebookClient
import pytest

from vgg_jax import train

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         'notebooks')


@pytest.fixture(scope='module')
def digits_workdir(tmp_path_factory, digits_config):
  """A briefly trained digits net (the notebooks' default checkpoint is the full run's)."""
  workdir = str(tmp_path_factory.mktemp('digits_run'))
  config = digits_config.copy_and_resolve_references()
  # The notebooks' outputs are checked, not the net's accuracy: a few steps make a checkpoint.
  config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 40, 40, 40
  train.train_and_evaluate(config, workdir)
  return workdir


def execute(name: str) -> tuple[nbformat.NotebookNode, float]:
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  start = time.perf_counter()
  NotebookClient(notebook, timeout=120, kernel_name='python3',
                 resources={'metadata': {'path': NOTEBOOKS}}).execute()
  return notebook, time.perf_counter() - start


def outputs(notebook, kind: str) -> list:
  found = []
  for cell in notebook.cells:
    for output in cell.get('outputs', []):
      if kind == 'stdout' and output.get('name') == 'stdout':
        found.append(output['text'])
      elif kind in output.get('data', {}):
        found.append(output['data'][kind])
  return found


@pytest.mark.slow
def test_quickstart_and_features_notebooks_run_within_two_minutes(digits_workdir, monkeypatch):
  monkeypatch.setenv('VGG_JAX_CHECKPOINT', digits_workdir)
  quickstart, quickstart_seconds = execute('quickstart.ipynb')
  features, features_seconds = execute('features.ipynb')
  printed = ''.join(outputs(quickstart, 'stdout'))
  assert 'net D, width 0.125, 10 classes' in printed
  top5 = [line for line in printed.splitlines() if line[:2] in {f'{i}.' for i in range(1, 6)}]
  assert len(top5) == 5, printed
  assert len(outputs(quickstart, 'image/png')) == 1
  assert 'fc7 features (360, 512) of 360 test images' in ''.join(outputs(features, 'stdout'))
  assert len(outputs(features, 'image/png')) == 2  # PCA + t-SNE; feature maps.
  assert quickstart_seconds + features_seconds <= 120, (quickstart_seconds, features_seconds)


DOCS = [os.path.join(os.path.dirname(NOTEBOOKS), 'README.md'),
        *sorted(os.path.join(os.path.dirname(NOTEBOOKS), 'docs', name)
                for name in os.listdir(os.path.join(os.path.dirname(NOTEBOOKS), 'docs'))
                if name.endswith('.md'))]


def python_snippets() -> list[tuple[str, str]]:
  """(file, code) of every ```python block of README.md and docs/."""
  snippets = []
  for path in DOCS:
    with open(path) as f:
      text = f.read()
    snippets += [(os.path.relpath(path, os.path.dirname(NOTEBOOKS)), code)
                 for code in re.findall(r'```python\n(.*?)```', text, re.S)]
  return snippets


@pytest.mark.slow
def test_the_python_snippets_of_the_readme_and_docs_run_as_written(digits_workdir, capsys):
  """Each block runs in a fresh namespace; the README's digits run is this module's."""
  snippets = python_snippets()
  assert {name for name, _ in snippets} >= {'docs/reuse.md', 'docs/configuration.md'}
  for name, code in snippets:
    namespace = {}
    exec(compile(code.replace("'workdirs/digits'", repr(digits_workdir)), name, 'exec'),  # pylint: disable=exec-used
         namespace)
    if 'get_config' in namespace:  # A config file shown whole.
      assert namespace['get_config']('S=384').train_scale == 384, name
  printed = capsys.readouterr().out
  assert '(2, 512)' in printed and "'probability'" in printed, printed
