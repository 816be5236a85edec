"""DDPM++ on CIFAR-10, continuous sub-VP SDE: FID 2.61, NLL 3.02 bits/dim."""

from configs.vp import cifar10_ddpmpp_continuous


def get_config():
  config = cifar10_ddpmpp_continuous.get_config()
  config.training.sde = 'subvpsde'
  return config
