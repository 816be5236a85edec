"""The DDPM U-Net on CIFAR-10, continuous VP SDE: NLL 3.21 bits/dim."""

from configs import _unet
from configs import default_cifar10_configs


def get_config():
  return _unet.vp(_unet.ddpm(default_cifar10_configs.get_default_configs()))
