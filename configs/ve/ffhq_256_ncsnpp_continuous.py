"""NCSN++ on FFHQ 256x256, continuous VE SDE.

The reference's values are CelebA-HQ 256's (``configs/ve/celebahq_256_ncsnpp_continuous.py``): point
data.path at a folder of FFHQ's images (--config.data.path=...).
"""

from configs.ve import celebahq_256_ncsnpp_continuous


def get_config():
  return celebahq_256_ncsnpp_continuous.get_config()
