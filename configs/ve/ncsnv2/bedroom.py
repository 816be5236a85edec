"""NCSNv2 (Song & Ermon 2020, deeper 128 px variant) on LSUN bedroom 128x128."""

from configs.default_lsun_configs import get_default_configs


def get_config():
  config = get_default_configs()
  # training
  training = config.training
  training.sde = 'vesde'
  training.continuous = False
  training.batch_size = 128
  # The reference misspells continuous ('continuouse'), leaving it True; fixed: NCSNv2 trains discretely.

  # sampling
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'none'
  sampling.corrector = 'ald'
  sampling.n_steps_each = 3
  sampling.snr = 0.095
  sampling.eps = 1e-05

  # data
  data = config.data
  data.category = 'bedroom'
  data.image_size = 128

  # model
  model = config.model
  model.name = 'ncsnv2_128'
  model.scale_by_sigma = True
  model.sigma_max = 190
  model.num_scales = 1086
  model.ema_rate = 0.9999
  model.normalization = 'InstanceNorm++'
  model.nonlinearity = 'elu'
  model.nf = 128
  model.interpolation = 'bilinear'

  # optim
  optim = config.optim
  # optim.amsgrad (read nowhere) dropped.
  optim.weight_decay = 0
  optim.optimizer = 'Adam'
  optim.lr = 0.0001
  optim.beta1 = 0.9
  optim.eps = 1e-08
  optim.warmup = 0
  optim.grad_clip = -1.0

  return config
