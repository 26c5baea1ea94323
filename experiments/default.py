"""The paper's ImageNet settings, `--config=experiments/default.py`: the package's own default
(vgg_jax/default_config.py, where every field is documented) so a pip-installed vgg_jax has it."""

from vgg_jax.default_config import get_config  # pylint: disable=unused-import
