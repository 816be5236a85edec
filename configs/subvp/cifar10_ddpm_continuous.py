"""The DDPM U-Net on CIFAR-10, continuous sub-VP SDE: NLL 3.05 bits/dim."""

from configs.vp.ddpm import cifar10_continuous


def get_config():
  config = cifar10_continuous.get_config()
  config.training.sde = 'subvpsde'
  return config
