"""MLP on the 2-D Gaussian mixture ('gmm'), continuous VE SDE."""

from configs.default_toy_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = 'vesde'
  config.training.continuous = True

  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  sampling.eps = 1e-5

  config.model.embedding_type = 'fourier'
  config.model.scale_by_sigma = True
  return config
