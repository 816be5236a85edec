"""NCSN++ on CelebA-HQ 1024x1024, continuous VE SDE."""

from configs.default_lsun_configs import get_default_configs


def get_config():
  config = get_default_configs()
  # training
  training = config.training
  training.batch_size = 8
  training.sde = 'vesde'
  training.continuous = True
  training.reduce_mean = False

  # sampling
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  sampling.snr = 0.15
  sampling.eps = 1e-05

  # evaluate
  evaluate = config.eval
  evaluate.batch_size = 1024
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 96

  # data
  data = config.data
  # No TFDS build without TensorFlow: point data.path at a folder of the images (--config.data.path=...).
  data.dataset = 'folder'
  data.path = ''
  data.image_size = 1024

  # model
  model = config.model
  # The reference imports torch here and reads TFRecords from a personal path; both removed. attention_type, conv_size and optim.amsgrad are read nowhere; dropped.
  model.name = 'ncsnpp'
  model.scale_by_sigma = True
  model.sigma_max = 1348
  model.num_scales = 2000
  model.ema_rate = 0.9999
  model.sigma_min = 0.01
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = 16
  model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
  model.num_res_blocks = 1
  model.attn_resolutions = (16,)
  model.dropout = 0.0
  model.resamp_with_conv = True
  model.conditional = True
  model.fir = True
  model.fir_kernel = [1, 3, 3, 1]
  model.skip_rescale = True
  model.resblock_type = 'biggan'
  model.progressive = 'output_skip'
  model.progressive_input = 'input_skip'
  model.progressive_combine = 'sum'
  model.init_scale = 0.0
  model.fourier_scale = 16
  model.embedding_type = 'fourier'

  return config
