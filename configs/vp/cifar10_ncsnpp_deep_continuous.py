"""NCSN++ (deep: 8 blocks per resolution) on CIFAR-10, continuous VP SDE."""

from configs import _unet
from configs.vp import cifar10_ncsnpp_continuous


def get_config():
  return _unet.deep(cifar10_ncsnpp_continuous.get_config())
