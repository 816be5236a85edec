"""NCSN++ (deep: 8 blocks per resolution) on CIFAR-10, continuous sub-VP SDE."""

from configs.vp import cifar10_ncsnpp_deep_continuous


def get_config():
  config = cifar10_ncsnpp_deep_continuous.get_config()
  config.training.sde = 'subvpsde'
  return config
