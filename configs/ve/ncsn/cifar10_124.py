"""NCSN with NCSNv2 techniques 1, 2, 4 (noise scales, steps, step size) on CIFAR-10."""

from configs import _ncsn
from configs.ve.ncsn import cifar10


def get_config():
  return _ncsn.techniques_124(cifar10.get_config(), sigma_max=50., num_scales=232, n_steps_each=5, snr=0.176)
