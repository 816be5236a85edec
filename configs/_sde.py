"""What choosing an SDE sets in a config, as the paper's configs (Song et al. 2021) set it: the SDE, how it
trains and how it samples. Experiment configs start from their defaults, choose an SDE here and state what
else differs. A sub-VP config is its VP twin with training.sde='subvpsde'."""


def ve(config, *, continuous=True):
  """VE SDE (SMLD when discrete): predictor-corrector sampling with reverse diffusion and Langevin (the
  defaults) down to t=1e-5; the network's output divided by sigma (NCSNv2's technique 3)."""
  config.training.sde = 'vesde'
  config.training.continuous = continuous
  config.sampling.eps = 1e-5
  config.model.scale_by_sigma = True
  return config


def vp(config, *, continuous=True):
  """VP SDE (DDPM when discrete): the loss averaged over dimensions; Euler-Maruyama (ancestral sampling
  when discrete) without a corrector, down to t=1e-3 (the default)."""
  config.training.sde = 'vpsde'
  config.training.continuous = continuous
  config.training.reduce_mean = True
  config.sampling.predictor = 'euler_maruyama' if continuous else 'ancestral_sampling'
  config.sampling.corrector = 'none'
  return config
