"""Defaults shared by the CIFAR-10 experiments (the reference's values; ours are marked 'ours')."""

import ml_collections


def get_default_configs():
  config = ml_collections.ConfigDict()

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128
  training.n_iters = 1300001
  training.snapshot_freq = 50000
  training.log_freq = 50
  training.eval_freq = 100
  training.snapshot_freq_for_preemption = 10000
  training.snapshot_sampling = True
  training.likelihood_weighting = False
  training.continuous = True
  training.n_jitted_steps = 5
  training.reduce_mean = False
  training.eps = 1e-5  # ours: t ~ U(eps, T) in the continuous loss (the reference hard-codes 1e-5)
  training.sliced_score_matching = False  # ours: sliced score matching (Song et al. 2019) instead of DSM
  training.ssm_variance_reduction = True  # ours
  training.ssm_n_projections = 1  # ours: random projections per example in sliced score matching
  training.snapshot_batch_size = 0  # ours: samples drawn at each snapshot (0 = training.batch_size)

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = 'pc'
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  sampling.n_steps_each = 1
  sampling.noise_removal = True
  sampling.probability_flow = False
  sampling.snr = 0.16
  sampling.eps = 1e-3  # ours as a key: the reference hard-codes 1e-3 (VP, sub-VP) and 1e-5 (VE configs set it)
  sampling.langevin_per_sample = False  # ours: per-sample Langevin step sizes instead of batch-averaged
  sampling.ode_method = 'dopri5'  # ours: on-device adaptive solver for the probability-flow ODE
  sampling.ode_rtol = 1e-5
  sampling.ode_atol = 1e-5

  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.begin_ckpt = 9
  evaluate.end_ckpt = 26
  evaluate.batch_size = 1024
  evaluate.enable_sampling = False
  evaluate.num_samples = 50000
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.bpd_dataset = 'test'
  evaluate.bpd_num_repeats = 5  # ours as a key: the reference hard-codes 5 (test) / 1 (train)
  evaluate.likelihood_eps = 1e-5  # ours as a key (reference: hard-coded 1e-5)
  evaluate.hutchinson_type = 'rademacher'
  evaluate.num_probes = 1
  evaluate.ode_method = 'dopri5'
  evaluate.ode_rtol = 1e-5
  evaluate.ode_atol = 1e-5
  # ours (sample quality, sample_quality.py):
  evaluate.inception_path = ''  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth ('' = torch hub cache)
  evaluate.stats_path = ''  # from --mode=fid_stats ('' = assets/stats/{dataset}_{image_size}_stats.npz)
  evaluate.feature_batch_size = 250  # images per Inception / digits-classifier batch

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'CIFAR10'
  data.image_size = 32
  data.random_flip = True
  data.centered = False
  data.uniform_dequantization = False
  data.num_channels = 3
  data.num_levels = 256  # ours: discrete values per pixel (dequantization, bits/dim); digits have 17
  data.path = ''  # ours: image directory for data.dataset='folder'
  data.category = ''  # ours: LSUN category (TFDS lsun/{category})
  data.tfds_data_dir = ''  # ours: TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets)
  data.dim = 2  # ours: dimension of toy data (gmm, checkerboard, swissroll, moons)
  # ours: how digits reach image_size: 'upsample' (nearest neighbour, a multiple of 8) or 'pad' (zeros
  # around the centre); '' = upsample when image_size is a multiple of 8, else pad.
  data.digits_layout = ''
  data.num_workers = 0  # ours: image-loading threads (0 = min(8, CPU count))

  config.model = model = ml_collections.ConfigDict()
  model.sigma_min = 0.01
  model.sigma_max = 50.  # float, so that --config.model.sigma_max=6.5 can override it
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.
  model.dropout = 0.1
  model.embedding_type = 'fourier'
  model.ema_warmup = False  # ours: True uses score_sde_pytorch's EMA warm-up min(rate, (1+n)/(10+n))
  # ours as defaults (the reference sets these in its experiment configs; ours change what differs):
  model.fourier_scale = 16.  # Gaussian Fourier features' scale, read with embedding_type='fourier'
  model.scale_by_sigma = False  # every network: divide the output by sigma
  # NCSN's noise-conditional normalisation rows, 0 = one per noise level (num_scales), the only value that
  # works (the reference never sets it, so its NCSN could not build).
  model.num_classes = 0
  model.interpolation = 'bilinear'  # NCSN / NCSNv2: how RefineNet resizes ('bilinear' or 'nearest')
  # The U-Net options (models/ncsnpp.py; the first two also models/ddpm.py) at the values of the
  # reference's NCSN++ CIFAR-10 configs.
  model.conditional = True
  model.resamp_with_conv = True
  model.resblock_type = 'biggan'
  model.fir = True
  model.fir_kernel = [1, 3, 3, 1]
  model.progressive = 'none'
  model.progressive_input = 'residual'
  model.progressive_combine = 'sum'
  model.skip_rescale = True
  model.init_scale = 0.

  config.optim = optim = ml_collections.ConfigDict()
  optim.weight_decay = 0.  # float, for command-line overrides
  optim.optimizer = 'Adam'
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.eps = 1e-8
  optim.warmup = 5000
  optim.grad_clip = 1.

  config.seed = 42
  return config
