"""NCSN with NCSNv2 technique 5 (EMA) on CelebA."""

from configs.ve.ncsn import celeba


def get_config():
  config = celeba.get_config()
  config.model.ema_rate = 0.999  # technique 5
  return config
