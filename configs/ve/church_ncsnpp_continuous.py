"""NCSN++ on LSUN church_outdoor 256x256, continuous VE SDE."""

from configs import _unet
from configs import default_lsun_configs


def get_config():
  config = _unet.ve(_unet.ncsnpp_256(default_lsun_configs.get_default_configs()))
  config.data.category = 'church_outdoor'
  config.model.sigma_max = 380.
  return config
