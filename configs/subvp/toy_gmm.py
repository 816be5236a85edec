"""MLP on the 2-D Gaussian mixture ('gmm'), continuous sub-VP SDE."""

from configs.default_toy_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = 'subvpsde'
  config.training.continuous = True

  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'euler_maruyama'
  sampling.corrector = 'none'
  sampling.eps = 1e-3

  config.model.embedding_type = 'positional'
  config.model.scale_by_sigma = False
  return config
