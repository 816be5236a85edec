"""NCSN++ on CIFAR-10, DDPM (discrete VP) training."""

from configs import _unet
from configs import default_cifar10_configs


def get_config():
  config = _unet.vp(_unet.ncsnpp(default_cifar10_configs.get_default_configs()), continuous=False)
  config.model.embedding_type = 'positional'
  config.sampling.predictor = 'reverse_diffusion'  # the reference's here, where DDPM++ samples ancestrally
  return config
