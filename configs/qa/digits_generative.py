"""Anomaly detector (``--mode=qa``) on the embedded 8x8 digits: the demo's *generative* score model as the
detector, decided on the two-sided profile score.

Where ``configs/qa/digits.py`` trains a detector only at the four noise levels it reports (λ = 1), this
one is the demo's NCSN++ and objective unchanged (``configs/ve/digits_ncsnpp_continuous.py``: the
continuous VE SDE from σ = 0.01 to 6, σ² weighting, 4,000 steps), trained on the train part of the
detector's data, and read at σ ∈ {0.02, 0.05, 0.1, 0.2}. On digits it separates every corruption of
``benchmarks/qa.py`` from clean test digits with profile AUROC ≥ 0.998 where the four-level detector stays
at 0.85–0.95 on strokes, the collapsed block and the blank half (BENCHMARKS.md, "The demo's generative
model as the detector"): a score model trained across all noise levels knows what a digit is, not only
how its noise looks.

  python main.py --config=configs/qa/digits_generative.py --workdir=runs/qa_gen --mode=train
  python main.py --config=configs/qa/digits_generative.py --workdir=runs/qa_gen --mode=qa --qa.input=x.npz
"""

from configs.ve import digits_ncsnpp_continuous

QA_SIGMAS = (0.02, 0.05, 0.1, 0.2)


def get_config():
  config = digits_ncsnpp_continuous.get_config()
  config.training.snapshot_sampling = False  # a detector: its samples are not looked at

  evaluate = config.eval
  evaluate.enable_bpd = False
  evaluate.enable_sampling = False

  qa = config.qa
  qa.sigmas = QA_SIGMAS
  qa.sigma = 0.05
  qa.score = 'profile'
  qa.calibrate_after_training = True
  return config
