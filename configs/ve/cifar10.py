"""The headline model, by its short name: NCSN++ (deep) on CIFAR-10, continuous VE SDE (FID 2.20, IS 9.89).

Identical to ``configs/ve/cifar10_ncsnpp_deep_continuous.py``.
"""

from configs.ve import cifar10_ncsnpp_deep_continuous


def get_config():
  return cifar10_ncsnpp_deep_continuous.get_config()
