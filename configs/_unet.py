"""The U-Net score networks of the paper's image experiments (Song et al. 2021, Appendix H) at their sizes:
Ho et al.'s DDPM (models/ddpm.py), NCSN++ and DDPM++ (models/ncsnpp.py); and what the paper sets with each
SDE when it trains them. The configs under ve/, vp/ and subvp/ that use these networks start here and state
what differs."""

from configs import _sde


def _sizes(config, name, num_res_blocks):
  """The CIFAR-10 sizes the three share: 128 channels, four resolutions, attention at 16x16."""
  model = config.model
  model.name = name
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = num_res_blocks
  model.attn_resolutions = (16,)
  return config


def ddpm(config):
  """Ho et al. (2020)'s U-Net: 2 residual blocks per resolution."""
  # The reference also sets conv_size, which nothing reads; dropped.
  return _sizes(config, 'ddpm', num_res_blocks=2)


def ddpm_256(config):
  """DDPM at 256x256, as Ho et al. train it: six resolutions, learning rate 2e-5."""
  config = ddpm(config)
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.optim.lr = 2e-5
  return config


def ncsnpp(config):
  """NCSN++: 4 residual blocks per resolution; BigGAN blocks, FIR resampling and the residual input path
  (the U-Net options the defaults hold)."""
  # The reference also sets attention_type and conv_size, which nothing reads; dropped.
  return _sizes(config, 'ncsnpp', num_res_blocks=4)


def ddpmpp(config):
  """DDPM++: NCSN++ without FIR resampling and without the residual input path."""
  config = ncsnpp(config)
  config.model.fir = False
  config.model.progressive_input = 'none'
  return config


def ncsnpp_256(config):
  """NCSN++ at 256x256: seven resolutions of 2 blocks, with output skips and input skips."""
  config = ncsnpp(config)
  model = config.model
  model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
  model.num_res_blocks = 2
  model.progressive = 'output_skip'
  model.progressive_input = 'input_skip'
  return config


def deep(config):
  """The paper's deep variant: 8 residual blocks per resolution, trained for 950k iterations."""
  config.model.num_res_blocks = 8
  config.training.n_iters = 950001
  return config


def ve(config, *, continuous=True):
  """The VE SDE as the paper trains these networks: data in [0, 1] (the default), EMA rate 0.999."""
  config = _sde.ve(config, continuous=continuous)
  config.model.ema_rate = 0.999
  return config


def vp(config, *, continuous=True):
  """The VP SDE as the paper (and DDPM) trains these networks: data in [-1, 1], EMA rate 0.9999."""
  config = _sde.vp(config, continuous=continuous)
  config.data.centered = True
  config.model.ema_rate = 0.9999
  return config
