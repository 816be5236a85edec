"""NCSN++ on CelebA-HQ 256x256, continuous VE SDE."""

from configs import _unet
from configs import default_lsun_configs


def get_config():
  config = _unet.ve(_unet.ncsnpp_256(default_lsun_configs.get_default_configs()))
  # The reference reads TFRecords from a personal path; replaced by an image folder. No TFDS build without
  # TensorFlow: point data.path at a folder of the images (--config.data.path=...).
  config.data.dataset = 'folder'
  config.model.sigma_max = 348.
  return config
