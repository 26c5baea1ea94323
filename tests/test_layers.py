"""The package's layers (WORKSPACE.md): each module imports only from its own layer or below,
without cycles, and TensorFlow stays in the input pipeline. Read from the source with `ast`,
function-local imports included, so nothing is imported to check it."""

import ast
import configparser
import importlib.metadata
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'vgg_jax')

# Bottom to top. 0: pure Python every layer may use; 1: the paper (Table 1, Sec. 3.2's rules,
# normalisation) and the kernels the net runs on; 2: steps and data; 3: state and evaluation;
# 4: jobs (the training loop, the CLIs, the notebook API); 5: entry.
LAYERS = {
    'errors': 0, 'user_cache': 0, 'default_config': 0, 'progress': 0, 'cli': 0,
    'ops': 1, 'winograd': 1, 'models': 1, 'protocol': 1, 'preprocess': 1,
    'steps': 2, 'input_pipeline': 2, 'datasets': 2,
    'checkpoints': 3, 'run_files': 3, 'init_from': 3, 'evaluation': 3, 'report': 3, 'config_validation': 3,
    'train': 4, 'evaluate': 4, 'inference': 4, 'convert': 4, 'summary': 4, 'plots': 4,
    'linear_probe': 4, 'prepare': 4,
    'main': 5, '__init__': 5,
}
PAPER = ('models', 'ops', 'protocol', 'preprocess')
TENSORFLOW = ('tensorflow', 'tensorflow_datasets')
# The modules that may import TensorFlow: the input pipeline, its datasets, and the CLI set-up
# that hides the accelerators from it.
TENSORFLOW_USERS = ('input_pipeline', 'datasets', 'cli')
# Imported only where a user asks for it, with an error saying what to install.
OPTIONAL = {'torch': 'convert.load_torch_file'}


def module_names() -> list[str]:
  names = []
  for root, _, files in os.walk(PACKAGE):
    for file in files:
      if file.endswith('.py'):
        path = os.path.relpath(os.path.join(root, file), PACKAGE)
        names.append(path[:-len('.py')].replace(os.sep, '.'))
  return sorted(names)


def layer_of(module: str) -> str:
  """'datasets.image_folder' -> 'datasets'."""
  return module.split('.')[0]


def imports(module: str) -> set[str]:
  """Everything `module` imports, anywhere in it: 'vgg_jax.X' for the package's modules, the
  top-level name for others."""
  with open(os.path.join(PACKAGE, *module.split('.')) + '.py') as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {alias.name if alias.name.startswith('vgg_jax.') else alias.name.split('.')[0]
                for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module == 'vgg_jax':
        found |= {f'vgg_jax.{alias.name}' for alias in node.names}
      elif node.module.startswith('vgg_jax.'):
        found.add(node.module)
      else:
        found.add(node.module.split('.')[0])
  return found


def package_imports(module: str) -> set[str]:
  return {layer_of(name[len('vgg_jax.'):]) for name in imports(module)
          if name.startswith('vgg_jax.')} - {layer_of(module)}


def test_every_module_has_a_layer():
  assert sorted({layer_of(m) for m in module_names()} - set(LAYERS)) == []


@pytest.mark.parametrize('module', module_names())
def test_module_imports_only_its_layer_and_below(module):
  upward = {name: LAYERS[name] for name in package_imports(module)
            if LAYERS[name] > LAYERS[layer_of(module)]}
  assert not upward, f'{module} (layer {LAYERS[layer_of(module)]}) imports {upward}'


def test_package_imports_have_no_cycle():
  graph = {}
  for module in module_names():
    graph.setdefault(layer_of(module), set()).update(package_imports(module))
  done, path = set(), []

  def visit(node):
    if node in path:
      pytest.fail(f'import cycle: {" -> ".join(path[path.index(node):] + [node])}')
    if node in done:
      return
    path.append(node)
    for child in sorted(graph.get(node, ())):
      visit(child)
    path.pop()
    done.add(node)

  for node in sorted(graph):
    visit(node)


@pytest.mark.parametrize('module', PAPER)
def test_the_paper_layer_knows_no_optimiser_data_checkpoint_or_tensorflow(module):
  """A notebook reuses the net without the training stack; accelerator images lack TF."""
  banned = {f'vgg_jax.{m}' for m in ('steps', 'input_pipeline', 'evaluation', 'checkpoints',
                                     'init_from', 'train')} | set(TENSORFLOW)
  assert not imports(module) & banned


def test_protocol_is_pure_python():
  assert not imports('protocol') & {'jax', 'flax', 'numpy', 'optax', *TENSORFLOW}


def test_evaluation_and_the_input_pipeline_meet_only_in_protocol():
  """Evaluation consumes batches; both read Sec. 3.2's rules from protocol."""
  assert 'vgg_jax.evaluation' not in imports('input_pipeline')
  assert 'vgg_jax.protocol' in imports('input_pipeline')
  assert 'vgg_jax.protocol' in imports('evaluation')


def test_checkpoints_build_nets_through_models_not_steps():
  assert 'vgg_jax.steps' not in imports('checkpoints')


@pytest.mark.parametrize('module', module_names())
def test_only_the_input_pipeline_and_cli_set_up_import_tensorflow(module):
  if layer_of(module) in TENSORFLOW_USERS:
    return
  assert not imports(module) & set(TENSORFLOW), module


@pytest.mark.parametrize('module', module_names())
def test_flags_are_defined_at_import_only_by_the_entry_point(module):
  """A library module that defines absl flags when imported clashes with the CLI importing it."""
  if module == 'main':
    return
  with open(os.path.join(PACKAGE, *module.split('.')) + '.py') as f:
    tree = ast.parse(f.read())
  at_import = [node.lineno for node in tree.body
               if isinstance(node, (ast.Expr, ast.Assign, ast.AnnAssign))
               and isinstance(node.value, ast.Call) and 'DEFINE' in ast.unparse(node.value.func)]
  assert not at_import, f'{module}: flags defined at import, lines {at_import}'


def test_the_checker_reads_function_local_imports():
  """The rules above see imports inside functions too: convert imports checkpoints lazily."""
  assert 'vgg_jax.checkpoints' in imports('convert')


def python_files(*folders: str) -> list[str]:
  return sorted(os.path.join(root, f) for folder in folders
                for root, _, files in os.walk(os.path.join(REPO, folder))
                for f in files if f.endswith('.py'))


def config_fallbacks(path: str) -> list[str]:
  """`config.get(field, default)` and `getattr(config, field, default)` calls in a file: a
  second default for a field default_config.py already holds."""
  with open(path) as f:
    tree = ast.parse(f.read())
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    func, args = node.func, node.args
    if (isinstance(func, ast.Attribute) and func.attr == 'get'
        and 'config' in ast.unparse(func.value).lower()) or (
            isinstance(func, ast.Name) and func.id == 'getattr' and args
            and 'config' in ast.unparse(args[0]).lower()):
      found.append(f'{os.path.relpath(path, REPO)}:{node.lineno}: {ast.unparse(node)}')
  return found


def test_config_fields_are_read_without_a_second_default():
  """default_config.py holds each field's default once; saved configs are merged onto it
  (checkpoints.load_config), so no reader needs a fallback that could disagree with it."""
  found = [hit for path in python_files('vgg_jax', 'launch', 'benchmarks', 'experiments')
           for hit in config_fallbacks(path)]
  assert not found, '\n'.join(found)


def _normalized(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def test_every_package_vgg_jax_imports_is_declared_in_setup_cfg():
  """`pip install vgg_jax` brings what it imports; a package that arrives only with another
  (array_record with tensorflow-datasets, on some platforms) is declared too."""
  setup = configparser.ConfigParser()
  setup.read(os.path.join(REPO, 'setup.cfg'))
  declared = {_normalized(re.match(r'[A-Za-z0-9_.-]+', line.strip()).group())
              for line in setup['options']['install_requires'].strip().splitlines()}
  distributions = importlib.metadata.packages_distributions()
  undeclared = {}
  for module in module_names():
    for name in imports(module):
      if name.startswith('vgg_jax') or name in sys.stdlib_module_names or name in OPTIONAL:
        continue
      if not {_normalized(d) for d in distributions.get(name, [name])} & declared:
        undeclared.setdefault(name, []).append(module)
  assert not undeclared, f'imported but not in setup.cfg install_requires: {undeclared}'
