"""Ho et al.'s DDPM U-Net trained with SMLD (discrete VE) on CIFAR-10."""

from configs import _unet
from configs import default_cifar10_configs


def get_config():
  return _unet.ve(_unet.ddpm(default_cifar10_configs.get_default_configs()), continuous=False)
