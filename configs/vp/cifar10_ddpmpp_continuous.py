"""DDPM++ on CIFAR-10, continuous VP SDE: FID 2.55, NLL 3.16 bits/dim."""

from configs import _unet
from configs import default_cifar10_configs


def get_config():
  config = _unet.vp(_unet.ddpmpp(default_cifar10_configs.get_default_configs()))
  config.model.embedding_type = 'positional'
  return config
