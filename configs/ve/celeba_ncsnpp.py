"""NCSN++ on CelebA 64x64, SMLD (discrete VE) training."""

from configs import _unet
from configs import default_celeba_configs


def get_config():
  config = _unet.ve(_unet.ncsnpp(default_celeba_configs.get_default_configs()), continuous=False)
  config.model.embedding_type = 'positional'  # of the noise-level index
  # The reference also sets sigma_begin=90, which nothing reads (sigma_max is 90 in the CelebA defaults);
  # dropped.
  return config
