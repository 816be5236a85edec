"""NCSN with NCSNv2 techniques 1, 2, 4, 5 on CelebA."""

from configs.ve.ncsn import celeba_124


def get_config():
  config = celeba_124.get_config()
  config.model.ema_rate = 0.999  # technique 5
  return config
