"""NCSN++ (small, DDPM++-style positional embedding) on 8x8 digits, continuous VP SDE."""

from configs import _sde
from configs import default_digits_configs


def get_config():
  config = _sde.vp(default_digits_configs.get_default_configs())
  config.model.embedding_type = 'positional'
  return config
