"""MLP on the 2-D Gaussian mixture ('gmm'), continuous sub-VP SDE."""

from configs.vp import toy_gmm


def get_config():
  config = toy_gmm.get_config()
  config.training.sde = 'subvpsde'
  return config
