"""Defaults shared by the 256x256 experiments (LSUN, and CelebA-HQ / FFHQ): CIFAR-10's with the reference's changes."""

from configs import default_cifar10_configs


def get_default_configs():
  config = default_cifar10_configs.get_default_configs()
  training = config.training
  training.batch_size = 64
  training.n_iters = 2400001
  training.snapshot_freq_for_preemption = 5000

  config.sampling.snr = 0.075

  evaluate = config.eval
  evaluate.begin_ckpt = 50
  evaluate.end_ckpt = 96
  evaluate.batch_size = 512
  evaluate.enable_sampling = True

  data = config.data
  data.dataset = 'LSUN'
  data.category = 'bedroom'
  data.image_size = 256

  model = config.model
  model.sigma_max = 378
  model.num_scales = 2000
  model.dropout = 0.
  return config
