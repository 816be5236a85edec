"""Anomaly detector (``--mode=qa``) on the embedded 8x8 digits: the production recipe, scaled to digits.

A small NCSN++ (32 base channels, four residual blocks: two at each of two resolutions, no attention)
trained by denoising score matching only at the noise levels σ ∈ {0.01, 0.05, 0.1, 0.2} (data units,
pixels in [0, 1]), with λ(σ) = 1: the loss is the residual ‖s(x + σε, σ) + ε/σ‖² itself, i.e. the
ε-prediction loss weighted by 1/σ². The VE SDE spans exactly those levels (σ(t) from 0.01 to 0.2), so
the continuous label of each level is σ. Training ends by calibrating the threshold at the 99.5th
percentile of the held-out clean 'test' split (``qa.calibrate_after_training``), written to
``workdir/qa_calibration.json``.

  python main.py --config=configs/qa/digits.py --workdir=runs/qa_digits --mode=train
  python main.py --config=configs/qa/digits.py --workdir=runs/qa_digits --mode=qa --qa.input=inputs.npz
"""

from configs import _sde
from configs import default_digits_configs

QA_SIGMAS = (0.01, 0.05, 0.1, 0.2)


def get_config():
  config = _sde.ve(default_digits_configs.get_default_configs())
  config.data.centered = False  # σ in units of [0, 1] pixels; NCSN++ centres its input itself

  training = config.training
  training.dsm_sigmas = QA_SIGMAS
  training.dsm_unit_weighting = True
  training.reduce_mean = True
  training.n_iters = 2000
  training.snapshot_freq = 2000
  training.snapshot_sampling = False  # a detector, not a generator: its SDE never reaches noise

  model = config.model
  model.sigma_min = QA_SIGMAS[0]
  model.sigma_max = QA_SIGMAS[-1]
  model.num_res_blocks = 2
  model.attn_resolutions = ()

  evaluate = config.eval
  evaluate.enable_bpd = False
  evaluate.enable_sampling = False

  qa = config.qa
  qa.sigmas = QA_SIGMAS
  qa.calibrate_after_training = True
  return config
