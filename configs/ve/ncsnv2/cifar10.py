"""NCSNv2 (Song & Ermon 2020) on CIFAR-10."""

from configs import _ncsn
from configs.ve.ncsn import cifar10_1245


def get_config():
  return _ncsn.ncsnv2(cifar10_1245.get_config(), 'ncsnv2_64')
