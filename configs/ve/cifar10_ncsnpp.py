"""NCSN++ on CIFAR-10, SMLD (discrete VE) training: FID 2.45 in the paper."""

from configs import _unet
from configs import default_cifar10_configs


def get_config():
  config = _unet.ve(_unet.ncsnpp(default_cifar10_configs.get_default_configs()), continuous=False)
  config.model.embedding_type = 'positional'  # of the noise-level index
  return config
