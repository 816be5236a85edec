"""NCSN++ on LSUN bedroom 256x256, continuous VE SDE (the LSUN defaults are bedroom's: sigma_max 378)."""

from configs import _unet
from configs import default_lsun_configs


def get_config():
  return _unet.ve(_unet.ncsnpp_256(default_lsun_configs.get_default_configs()))
