"""The error a bad config raises: pure Python, so every layer (the TF input pipeline included)
can raise it and entry points can catch it, without importing anything else of vgg_jax."""


class ConfigError(ValueError):
  """A config field holds a value vgg_jax cannot run with; the message names the field, the
  value and what to change."""


def bad_field(field: str, value, why: str) -> ConfigError:
  """The error for config.`field` holding `value`, saying `why` and what to change."""
  return ConfigError(f'config.{field}={value!r}: {why}')
