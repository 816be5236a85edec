"""NCSN++ on CIFAR-10, continuous VE SDE: FID 2.38."""

from configs import _unet
from configs import default_cifar10_configs


def get_config():
  return _unet.ve(_unet.ncsnpp(default_cifar10_configs.get_default_configs()))
