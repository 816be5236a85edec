"""DDPM++ (deep: 8 blocks per resolution) on CIFAR-10, continuous sub-VP SDE: FID 2.41, NLL 2.99 bits/dim."""

from configs.vp import cifar10_ddpmpp_deep_continuous


def get_config():
  config = cifar10_ddpmpp_deep_continuous.get_config()
  config.training.sde = 'subvpsde'
  return config
