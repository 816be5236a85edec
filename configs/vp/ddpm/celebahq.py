"""DDPM (Ho et al. 2020) on CelebA-HQ 256x256, discrete VP."""

from configs import _unet
from configs import default_lsun_configs


def get_config():
  config = _unet.vp(_unet.ddpm_256(default_lsun_configs.get_default_configs()), continuous=False)
  # The reference reads TFRecords from a personal path; replaced by an image folder. CelebA-HQ has no TFDS
  # build without TensorFlow: point data.path at a folder of its images.
  config.data.dataset = 'folder'
  return config
