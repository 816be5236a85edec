"""DDPM (Ho et al. 2020) on CIFAR-10, discrete VP: FID 3.24, NLL 3.28 bits/dim."""

from configs import _unet
from configs import default_cifar10_configs


def get_config():
  return _unet.vp(_unet.ddpm(default_cifar10_configs.get_default_configs()), continuous=False)
