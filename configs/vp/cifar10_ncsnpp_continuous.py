"""NCSN++ on CIFAR-10, continuous VP SDE."""

from configs import _unet
from configs import default_cifar10_configs


def get_config():
  config = _unet.vp(_unet.ncsnpp(default_cifar10_configs.get_default_configs()))
  config.model.embedding_type = 'positional'
  return config
