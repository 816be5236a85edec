"""NCSN++ (small) on 8x8 digits, continuous VE SDE: the embedded default (`make demo`)."""

from configs.default_digits_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = 'vesde'
  config.training.continuous = True
  config.training.reduce_mean = False
  # VE on [0,1] data as in the reference's VE configs; NCSN++ centres its input itself.
  config.data.centered = False

  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  sampling.eps = 1e-5

  model = config.model
  model.embedding_type = 'fourier'
  model.scale_by_sigma = True
  return config
