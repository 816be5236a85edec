"""DDPM++ on CIFAR-10, DDPM (discrete VP) training: FID 2.78."""

from configs import _unet
from configs import default_cifar10_configs


def get_config():
  config = _unet.vp(_unet.ddpmpp(default_cifar10_configs.get_default_configs()), continuous=False)
  config.model.embedding_type = 'positional'
  return config
