"""The small JSON files a workdir holds beside its Orbax checkpoints.

classes.json names the classes in label order, so predictions can be read (training runs and
`vgg_jax.convert` write it); source.json records the weights file an imported net came from,
which marks the workdir as a conversion rather than a training run.
"""

import json
from typing import Optional, Sequence

from etils import epath
import jax

CLASS_NAMES = 'classes.json'
SOURCE_RECORD = 'source.json'


def write_class_names(workdir: str, names: Sequence[str]) -> None:
  """WORKDIR/classes.json: the class names in label order (process 0 writes it)."""
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / CLASS_NAMES).write_text(json.dumps(list(names), indent=0))


def class_names(workdir: str) -> Optional[list[str]]:
  """The class names of WORKDIR's net in label order; None if it has none recorded."""
  path = epath.Path(workdir) / CLASS_NAMES
  return json.loads(path.read_text()) if path.exists() else None


def is_conversion(workdir: str) -> bool:
  """Whether WORKDIR holds weights imported by `vgg_jax.convert`."""
  return (epath.Path(workdir) / SOURCE_RECORD).exists()
