"""NCSNv2 (Song & Ermon 2020) on CelebA 64x64."""

from configs import _ncsn
from configs.ve.ncsn import celeba_1245


def get_config():
  return _ncsn.ncsnv2(celeba_1245.get_config(), 'ncsnv2_64')
