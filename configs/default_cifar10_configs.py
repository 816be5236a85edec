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
  # ours: with likelihood_weighting, t ~ q(t) ∝ g²/σ² (Song, Durkan, Murray, Ermon 2021, Sec. 5.1)
  training.importance_sampling = False
  training.continuous = True
  training.n_jitted_steps = 5
  training.reduce_mean = False
  training.eps = 1e-5  # ours: t ~ U(eps, T) in the continuous loss (the reference hard-codes 1e-5)
  training.sliced_score_matching = False  # ours: sliced score matching (Song et al. 2019) instead of DSM
  training.ssm_variance_reduction = True  # ours
  training.ssm_n_projections = 1  # ours: random projections per example in sliced score matching
  training.snapshot_batch_size = 0  # ours: samples drawn at each snapshot (0 = training.batch_size)
  # ours: continuous DSM only at these noise levels (data units; SDE.noise_level_time), () = t ~ U(eps, T)
  training.dsm_sigmas = ()
  training.dsm_unit_weighting = False  # ours: λ = 1, the loss ‖s + z/σ‖² (the anomaly residual itself)
  # ours: the network's compute dtype, 'float32' or 'bfloat16' (parameters, optimizer state and EMA stay
  # float32; models/utils.with_compute_dtype)
  training.dtype = 'float32'

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = 'pc'
  sampling.dtype = 'float32'  # ours: compute dtype of every eval-mode score (sampling, likelihood, QA)
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
  # ours: the fast samplers (method 'heun', 'edm_sde', 'dpm_solver++', 'ggf'; scoresde/fast_samplers.py)
  sampling.num_steps = 18  # fixed-step methods' times incl. the last step to σ = 0 (EDM: 18 → Heun's 35 NFE)
  sampling.schedule = 'auto'  # 'edm' (ρ-schedule in σ), 'uniform_t', 'logsnr'; 'auto': uniform_t for heun
  # on VP and sub-VP, else edm (measured; scoresde/fast_samplers.resolve_schedule)
  sampling.rho = 7.  # EDM's ρ
  sampling.dpm_order = 2  # 2: DPM-Solver++(2M) multistep; 3: third-order single-step DPM-Solver
  sampling.s_churn = 10.  # edm_sde: EDM Alg. 2's stochasticity; EDM tunes these per model (its Table 5)
  sampling.s_tmin = 0.05
  sampling.s_tmax = 50.
  sampling.s_noise = 1.  # > 1 offsets a network's over-denoising; an exact score wants 1
  sampling.ggf_atol = 0.0078  # ggf: Gotta Go Fast's tolerances (2/255 on [-1, 1] data) and first step
  sampling.ggf_rtol = 0.05
  sampling.ggf_h_init = 0.01
  # ours: controllable generation (scoresde/controllable.py; Song et al. 2021, Sec. 5, App. I) in --mode=sample
  sampling.condition = 'none'  # 'none', 'inpaint', 'colorize' or 'class'
  # inpaint: the region to fill, 'lower_half', 'upper_half', 'left_half', 'right_half', 'center', or a
  # .png/.npy mask (1 = known)
  sampling.inpaint_mask = 'lower_half'
  sampling.condition_input = ''  # inpaint/colorize inputs: a .png or .npy of images; '' = the test split
  sampling.class_label = -1  # class: every sample's label; -1 cycles through 0..classifier.num_classes-1
  sampling.guidance_scale = 1.  # class: w in ∇log p_t(x) + w ∇log p_t(y|x); 1 is Bayes' rule
  sampling.classifier_checkpoint = ''  # class: a checkpoint_<k> dir ('' = the newest in workdir/classifier)

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
  data.path = ''  # ours: image directory for data.dataset='folder'; .npy/.npz file or directory for 'arrays'
  data.holdout_fraction = 0.1  # ours: data.dataset='arrays': the fraction held out as the 'test' split
  data.labels = False  # ours: batches carry 'label' (int32) too; only the classifier's training asks
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
  # ours: per-block activation checkpointing (nn.remat of each residual / attention block): the backward
  # pass recomputes activations instead of storing them; same function, less memory (benchmarks/memory_plan.py)
  model.remat = False
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

  # ours: score-based anomaly detection (scoresde/anomaly.py; main.py --mode=qa, --mode=qa_calibrate)
  config.qa = qa = ml_collections.ConfigDict()
  qa.sigma = 0.05  # the decision's noise level (data units): ‖s(x + σε) + ε/σ‖²
  qa.sigmas = (0.01, 0.05, 0.1, 0.2)  # residuals reported (and fused) at these; must include qa.sigma
  qa.num_draws = 8  # noise draws per input and σ
  qa.percentile = 99.5  # threshold: this percentile of the held-out clean scores
  # The decision's score: 'sigma' (the recipe: the residual at qa.sigma), 'fused' (the sum over qa.sigmas
  # of residuals standardised on the clean calibration set) or 'profile' (two-sided: the Mahalanobis
  # distance of the log residuals across qa.sigmas; also rejects inputs explained too well, e.g. blanks).
  qa.score = 'sigma'
  qa.calibration_split = 'test'  # the held-out clean split the threshold is computed on
  qa.calibrate_after_training = False  # --mode=train ends by calibrating (the qa/ configs)
  qa.heatmaps = True  # a per-channel heatmap PNG for every rejected input

  # ours: the noise-conditional classifier p_t(y | x) of class-conditional sampling (--mode=train_classifier,
  # scoresde/models/classifier.py): the reference's Wide-ResNet 28-10 with GroupNorm and Fourier noise features.
  # It trains with config.training's schedule and config.optim, into workdir/classifier.
  config.classifier = classifier = ml_collections.ConfigDict()
  classifier.name = 'noise_conditional_wrn'
  classifier.num_classes = 10
  classifier.blocks_per_group = 4  # WRN-28-10: (28 - 4) / 6 blocks per group, width multiplier 10
  classifier.channel_multiplier = 10
  classifier.embedding_size = 128  # Fourier features of log(s/a), scale 16, then Dense 512 - swish - Dense 512
  classifier.fourier_scale = 16.
  classifier.embedding_dim = 512
  classifier.eval_times = (0.01, 0.1, 0.25, 0.5, 0.75, 1.)  # eval accuracy at these t (noise levels)

  config.seed = 42
  return config
