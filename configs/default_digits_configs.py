"""Defaults for the embedded demo: scikit-learn's handwritten digits (1,797 8x8 images, 17 grey levels),
at their native 8x8, with a small NCSN++ (nf 32, 0.75M parameters) that trains on a 2-core CPU in minutes:
4,000 steps at batch 64 (about 6 minutes) give recognisable digits (the README's grid).

Built on the CIFAR-10 defaults; every change is listed here. The experiment configs
``configs/{ve,vp,subvp}/digits_ncsnpp_continuous.py`` choose the SDE and its sampler.
"""

from configs import default_cifar10_configs


def get_default_configs():
  config = default_cifar10_configs.get_default_configs()

  training = config.training
  training.batch_size = 64
  training.n_iters = 4000
  training.snapshot_freq = 4000
  training.eval_freq = 250
  training.snapshot_freq_for_preemption = 500
  training.n_jitted_steps = 1  # on CPU each extra step per call costs a full compile (run_lib unrolls)
  training.snapshot_batch_size = 64  # ours: samples drawn at each snapshot (an 8x8 grid)

  evaluate = config.eval
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 1
  evaluate.batch_size = 100  # the 300-image test split in 3 batches
  evaluate.enable_bpd = True
  evaluate.bpd_num_repeats = 1
  evaluate.enable_sampling = True
  evaluate.num_samples = 300  # compare with the 300-sample control row of BENCHMARKS.md

  data = config.data
  data.dataset = 'digits'
  data.image_size = 8
  data.num_channels = 1
  data.num_levels = 17
  data.random_flip = False  # mirrored digits are not digits
  data.centered = True

  model = config.model
  model.name = 'ncsnpp'
  model.sigma_max = 6.  # above the largest distance (4.8) between two [0,1] 8x8 digits (Song & Ermon 2020)
  model.num_scales = 500  # sampling steps; 500 suffice for 8x8 digits and halve the sampling time
  model.dropout = 0.
  model.ema_rate = 0.999
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = 32
  model.ch_mult = (1, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (4,)
  model.fir = False
  model.progressive_input = 'none'

  optim = config.optim
  optim.lr = 2e-3
  optim.warmup = 200

  classifier = config.classifier  # a WRN-10-2 (widths 32/64/128) for --mode=train_classifier
  classifier.blocks_per_group = 1
  classifier.channel_multiplier = 2
  classifier.embedding_dim = 128
  return config
