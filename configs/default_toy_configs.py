"""Defaults for 2-D toy data (data.dataset in gmm, checkerboard, swissroll, moons) with the MLP score
network: seconds per thousand steps on a CPU, for tests and quick experiments. 'gmm' is
``gaussian_mixture.default_mixture``, whose exact scores are known at every t.

Built on the CIFAR-10 defaults; every change is listed here.
"""

from configs import default_cifar10_configs


def get_default_configs():
  config = default_cifar10_configs.get_default_configs()

  training = config.training
  training.batch_size = 256
  training.n_iters = 2000
  training.snapshot_freq = 1000
  training.log_freq = 100
  training.eval_freq = 500
  training.snapshot_freq_for_preemption = 500
  training.snapshot_batch_size = 2048  # ours: samples drawn at each snapshot
  training.reduce_mean = True

  evaluate = config.eval
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 2
  evaluate.num_samples = 4096

  data = config.data
  data.dataset = 'gmm'
  data.random_flip = False

  model = config.model
  model.name = 'mlp'
  model.nf = 128
  model.num_layers = 3
  model.sigma_max = 10.  # about the largest distance between two points of the mixture
  model.dropout = 0.
  model.ema_rate = 0.99  # runs are a few thousand steps: 0.999 would still remember the first ones

  optim = config.optim
  optim.lr = 1e-3
  optim.warmup = 100
  return config
