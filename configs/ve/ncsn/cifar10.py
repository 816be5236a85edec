"""NCSN (Song & Ermon 2019) on CIFAR-10."""

from configs import _ncsn
from configs import default_cifar10_configs


def get_config():
  return _ncsn.ncsn(default_cifar10_configs.get_default_configs())
