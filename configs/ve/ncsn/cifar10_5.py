"""NCSN with NCSNv2 technique 5 (EMA) on CIFAR-10."""

from configs.default_cifar10_configs import get_default_configs


def get_config():
  config = get_default_configs()
  # training
  training = config.training
  training.sde = 'vesde'
  training.continuous = False

  # sampling
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'none'
  sampling.corrector = 'ald'
  sampling.n_steps_each = 100
  sampling.snr = 0.316
  sampling.eps = 1e-05

  # model
  model = config.model
  model.name = 'ncsn'
  model.scale_by_sigma = False
  model.sigma_max = 1.0
  model.num_scales = 10
  model.ema_rate = 0.999
  model.normalization = 'InstanceNorm++'
  model.nonlinearity = 'elu'
  model.nf = 128
  model.interpolation = 'bilinear'

  # optim
  optim = config.optim
  # optim.amsgrad (read nowhere) dropped.
  optim.weight_decay = 0
  optim.optimizer = 'Adam'
  optim.lr = 0.001
  optim.beta1 = 0.9
  optim.eps = 1e-08
  optim.warmup = 0
  optim.grad_clip = -1.0

  return config
