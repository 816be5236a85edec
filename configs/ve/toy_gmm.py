"""MLP on the 2-D Gaussian mixture ('gmm'), continuous VE SDE."""

from configs import _sde
from configs import default_toy_configs


def get_config():
  return _sde.ve(default_toy_configs.get_default_configs())
