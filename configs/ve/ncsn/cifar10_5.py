"""NCSN with NCSNv2 technique 5 (EMA) on CIFAR-10."""

from configs.ve.ncsn import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.ema_rate = 0.999  # technique 5
  return config
