"""The DDPM U-Net without time conditioning, CIFAR-10, discrete VP."""

from configs.vp.ddpm import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.conditional = False
  return config
