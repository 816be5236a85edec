"""NCSN with NCSNv2 techniques 1, 2, 4 (noise scales, steps, step size) on CelebA."""

from configs import _ncsn
from configs.ve.ncsn import celeba


def get_config():
  return _ncsn.techniques_124(celeba.get_config(), sigma_max=90., num_scales=500, n_steps_each=5, snr=0.128)
