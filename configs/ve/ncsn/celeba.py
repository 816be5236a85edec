"""NCSN (Song & Ermon 2019) on CelebA."""

from configs import _ncsn
from configs import default_celeba_configs


def get_config():
  # The reference sets training.loss = 'vesde' here, meaning training.sde; fixed.
  return _ncsn.ncsn(default_celeba_configs.get_default_configs())
