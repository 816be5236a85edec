"""NCSN++ on CelebA-HQ 1024x1024, continuous VE SDE: the 256x256 config at 1024, with a narrower, deeper
U-Net (nf 16, eight resolutions of one block) and batch 8."""

from configs.ve import celebahq_256_ncsnpp_continuous


def get_config():
  config = celebahq_256_ncsnpp_continuous.get_config()
  # The reference imports torch here and reads TFRecords from a personal path; both removed. optim.amsgrad
  # is read nowhere; dropped.
  config.training.batch_size = 8
  config.sampling.snr = 0.15

  evaluate = config.eval
  evaluate.batch_size = 1024
  evaluate.begin_ckpt = 1

  config.data.image_size = 1024

  model = config.model
  model.sigma_max = 1348.
  model.ema_rate = 0.9999
  model.nf = 16
  model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
  model.num_res_blocks = 1
  return config
