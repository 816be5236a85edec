"""NCSN++ (small, DDPM++-style positional embedding) on 8x8 digits, continuous VP SDE."""

from configs.default_digits_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = 'vpsde'
  config.training.continuous = True
  config.training.reduce_mean = True

  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'euler_maruyama'
  sampling.corrector = 'none'
  sampling.eps = 1e-3

  model = config.model
  model.embedding_type = 'positional'
  model.scale_by_sigma = False
  return config
