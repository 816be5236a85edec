"""MLP on the 2-D Gaussian mixture ('gmm'), continuous VP SDE."""

from configs import _sde
from configs import default_toy_configs


def get_config():
  config = _sde.vp(default_toy_configs.get_default_configs())
  config.model.embedding_type = 'positional'
  return config
