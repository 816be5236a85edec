"""DDPM (Ho et al. 2020) on LSUN bedroom 256x256, discrete VP."""

from configs import _unet
from configs import default_lsun_configs


def get_config():
  return _unet.vp(_unet.ddpm_256(default_lsun_configs.get_default_configs()), continuous=False)
