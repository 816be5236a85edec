"""NCSN (Song & Ermon 2019) and what NCSNv2 (Song & Ermon 2020) changes in it, technique by technique: the
base of configs/ve/ncsn/ (NCSN and its ablations, named by the techniques they add) and configs/ve/ncsnv2/."""


def ncsn(config):
  """NCSN: a RefineNet with conditional instance norm++, 10 noise levels from 1 down to 0.01, trained as
  SMLD (discrete VE); annealed Langevin dynamics with 100 steps per level; no EMA; Adam at 1e-3 without
  warm-up or gradient clipping."""
  training = config.training
  training.sde = 'vesde'
  training.continuous = False

  sampling = config.sampling
  sampling.predictor = 'none'
  sampling.corrector = 'ald'
  sampling.n_steps_each = 100
  sampling.snr = 0.316
  sampling.eps = 1e-5

  model = config.model
  model.name = 'ncsn'
  model.sigma_max = 1.
  model.num_scales = 10
  model.ema_rate = 0.
  model.normalization = 'InstanceNorm++'
  model.nonlinearity = 'elu'
  model.nf = 128

  optim = config.optim
  # optim.amsgrad (read nowhere) dropped.
  optim.lr = 1e-3
  optim.warmup = 0
  optim.grad_clip = -1.
  return config


def techniques_124(config, *, sigma_max, num_scales, n_steps_each, snr):
  """NCSNv2's techniques 1 (sigma_max about the largest distance between two training images), 2 (the
  number of noise levels, geometric down to sigma_min) and 4 (n_steps_each Langevin steps per level, with
  the step size that snr sets)."""
  config.model.sigma_max = sigma_max
  config.model.num_scales = num_scales
  config.sampling.n_steps_each = n_steps_each
  config.sampling.snr = snr
  return config


def ncsnv2(config, name):
  """NCSNv2 on an NCSN config with techniques 1, 2, 4 and 5: technique 3 (the output divided by sigma),
  the deeper RefineNet (name: 'ncsnv2_64' up to 64x64, 'ncsnv2_128' above) and learning rate 1e-4."""
  config.model.name = name
  config.model.scale_by_sigma = True
  config.optim.lr = 1e-4
  return config
