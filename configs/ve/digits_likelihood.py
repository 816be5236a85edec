"""Maximum-likelihood training on 8x8 digits under VE (Song, Durkan, Murray, Ermon 2021): the demo
(``configs/ve/digits_ncsnpp_continuous.py``) trained on uniformly dequantized data.

Under VE the likelihood weighting λ(t) = g(t)² is the demo's σ² weighting times a constant
(g² = σ² · 2 log(σ_max/σ_min)) and t importance-sampled ∝ g²/σ² is uniform, so the demo's objective *is*
the maximum-likelihood objective; what it lacked is data off the grid. Trained on (x + u)/17 its density
no longer peaks at the 17 grey levels, which the dequantized bits/dim (and the ELBO) pay for: 1.92 (1.89
with the variational flow) against the demo's 2.24 bits/dim at the same 4,000 steps, with the same
digits-FID (6.3 against 6.4; samples are mapped back to the levels, ``datasets.samples_to_levels``). BENCHMARKS.md, "Likelihood training on digits".

  python main.py --config=configs/ve/digits_likelihood.py --workdir=runs/digits_ve_lik --mode=train
  python main.py --config=configs/ve/digits_likelihood.py --workdir=runs/digits_ve_lik --mode=train_deq
  python main.py --config=configs/ve/digits_likelihood.py --workdir=runs/digits_ve_lik --mode=eval
"""

from configs.ve import digits_ncsnpp_continuous


def get_config():
  config = digits_ncsnpp_continuous.get_config()
  config.data.uniform_dequantization = True
  # --mode=train_deq (variational dequantization, their Sec. 5.2) after training; other deq_* keys default
  # (dequantization_training.DEFAULTS). --mode=eval reports the ELBO bound next to the ODE bits/dim.
  config.training.deq_n_iters = 1000
  config.eval.elbo_num_samples = 4
  return config
