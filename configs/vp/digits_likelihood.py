"""Maximum-likelihood training on 8x8 digits (Song, Durkan, Murray, Ermon 2021): the demo's NCSN++ under
the VP SDE with the likelihood weighting λ(t) = g(t)² and t importance-sampled ∝ g²/σ² (their Sec. 5.1).

Compare with the demo (configs/ve/digits_ncsnpp_continuous.py, σ² weighting) at the same steps in
BENCHMARKS.md, "Likelihood training". Under VE the likelihood weighting is the σ² weighting times a constant
(g² = σ² · 2 log(σ_max/σ_min)) and the importance distribution is uniform, so the likelihood objective
only differs from the demo's under VP or sub-VP.
"""

from configs import _sde
from configs import default_digits_configs


def get_config():
  config = _sde.vp(default_digits_configs.get_default_configs())
  config.model.embedding_type = 'positional'
  config.training.likelihood_weighting = True
  config.training.importance_sampling = True
  # --mode=train_deq (variational dequantization, their Sec. 5.2) after training; other deq_* keys default
  # (dequantization_training.DEFAULTS). --mode=eval reports the ELBO bound next to the ODE bits/dim.
  config.training.deq_n_iters = 1000
  config.eval.elbo_num_samples = 4
  config.sampling.method = 'edm_sde'
  config.sampling.num_steps = 18
  return config
