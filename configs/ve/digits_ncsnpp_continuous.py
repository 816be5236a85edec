"""NCSN++ (small) on 8x8 digits, continuous VE SDE: the embedded default (`make demo`)."""

from configs import _sde
from configs import default_digits_configs


def get_config():
  config = _sde.ve(default_digits_configs.get_default_configs())
  # VE on [0,1] data as in the reference's VE configs; NCSN++ centres its input itself.
  config.data.centered = False
  return config
