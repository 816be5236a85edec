"""Anomaly detector on VAE latents (64x64x4 floats, e.g. SDXL's), the production recipe as it is:
DSM at σ ∈ {0.01, 0.05, 0.1, 0.2} (latent units) weighted as the digits detector (``qa/digits.py``),
a small NCSN++ of 32 base channels with four residual blocks (one at each of four resolutions, 64 → 8),
threshold at the 99.5th percentile of held-out clean latents (5% of the arrays).

  python main.py --config=configs/qa/latents.py --workdir=runs/qa_latents --mode=train \
      --config.data.path=latents/   # .npy / .npz arrays (N, 64, 64, 4), float
"""

from configs.qa import digits


def get_config():
  config = digits.get_config()

  data = config.data
  data.dataset = 'arrays'
  data.image_size = 64
  data.num_channels = 4
  data.holdout_fraction = 0.05
  data.num_levels = 256  # unused by arrays (no quantisation)

  model = config.model
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 1

  training = config.training
  training.n_iters = 50000
  training.snapshot_freq = 5000
  training.snapshot_freq_for_preemption = 1000

  config.eval.batch_size = 16  # inputs per batch of --mode=qa (each one runs K x len(qa.sigmas) times)
  return config
