"""NCSN++ (small, DDPM++-style positional embedding) on 8x8 digits, continuous sub-VP SDE."""

from configs.vp import digits_ncsnpp_continuous


def get_config():
  config = digits_ncsnpp_continuous.get_config()
  config.training.sde = 'subvpsde'
  return config
