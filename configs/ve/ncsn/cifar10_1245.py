"""NCSN with NCSNv2 techniques 1, 2, 4, 5 on CIFAR-10."""

from configs.ve.ncsn import cifar10_124


def get_config():
  config = cifar10_124.get_config()
  config.model.ema_rate = 0.999  # technique 5
  return config
