"""Controllable generation (Song et al. 2021, Sec. 5 and App. I) against exact truth.

- Class guidance: a Gaussian mixture whose components are the classes has an exact noise-conditional
  classifier, p_t(y | x) = the responsibilities of the noised mixture, and ∇ log p_t(x) + ∇ log p_t(y | x)
  is the score of the noised component y. Guided samples must therefore be component y's samples, judged
  with the sampler tests' statistics and tolerance (``test_sampling.mixture_z_scores``, 5 standard errors).
- Inpainting and colorization: for Gaussian data N(μ, Σ), the conditional of the unknown coordinates given
  the known ones is Gaussian in closed form. The replacement method is exact when the two parts are
  independent (tested for every kind of sampler) and an approximation otherwise. Its error on the
  correlated Gaussian below (correlations up to 0.8), measured with 20,000 samples at N = 1,000 steps, in
  units of the true conditional standard deviations (mean; covariance entries / (sd_i sd_j)):

    sampler (config.sampling)                    SDE          mean error        covariance error
    PC reverse diffusion + Langevin (the paper's) VE           -0.004, -0.010    ≤ 0.024
    PC Euler-Maruyama + Langevin                  VP           -0.09, -0.12      ≤ 0.07  (5,000 samples)
    PC predictor only (EM or reverse diffusion)   VE, VP, subVP -1.16, -0.97     ≤ 0.77
    probability-flow ODE (dopri5)                 all three     -1.67, -1.28     ≤ 1.54
    heun (35 NFE), dpm_solver++ (18 NFE)          VE, VP        -1.65, -1.27     ≤ 1.74

  (The adaptive 'ode' sampler solves each sample separately; its known values and masks, like class
  labels, reach their own sample's solve as a ``sampling.ConditionalScore``'s per-sample conditions.)

  The Langevin corrector's MCMC at each noise level is what lets the unknown part follow the known one;
  without it (and with every deterministic sampler) the completion is pulled too weakly: its mean lies
  between the unconditional and the conditional mean and its spread is too wide. Tests assert each
  method's error within its measured envelope plus 5 standard errors, and that the known part is
  returned exactly.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import default_cifar10_configs
from configs.ve import cifar10
from configs.ve import digits_ncsnpp_continuous
from scoresde import checkpointing
from scoresde import classifier_training
from scoresde import controllable
from scoresde import datasets
from scoresde import gaussian_mixture
from scoresde import generate
from scoresde import sampling
from scoresde.models import utils as mutils
from test_sampling import EPS, MIXTURE, STD, Z_TOL, make_sde, mixture_z_scores

N_SAMPLES = 10_000


def sampling_config(method='pc', predictor='reverse_diffusion', corrector='langevin', num_steps=None):
  config = default_cifar10_configs.get_default_configs()
  config.sampling.method = method
  config.sampling.predictor = predictor
  config.sampling.corrector = corrector
  if num_steps is not None:
    config.sampling.num_steps = num_steps
  return config


def mixture_logits_fn(sde, data: gaussian_mixture.GaussianMixture):
  """The exact classifier of an isotropic mixture's components: logits log w_k + log N(x; a μ_k, v_k I),
  v_k = a² s_k² + σ² (a, σ the SDE's marginal coefficients), with no linear solves."""
  stds = jnp.sqrt(data.covs[:, 0, 0])
  log_weights = jnp.log(data.weights)

  def logits(x, t):
    flat = x.reshape(x.shape[0], -1)
    scale, std = sde.marginal_coeffs(t)
    var = scale[:, None]**2 * stds[None]**2 + std[:, None]**2
    diff = scale[:, None, None] * data.means[None] - flat[:, None]
    return log_weights[None] - 0.5 * jnp.sum(diff**2, -1) / var - 0.5 * data.dim * jnp.log(var)
  return logits


def test_colorization_matrix_is_the_references():
  """Orthogonal, grey channel first; equal to the reference's float32 decimals."""
  m = controllable.COLORIZATION_MATRIX
  reference = np.array([[5.7735014e-01, -8.1649649e-01, 4.7008697e-08],
                        [5.7735026e-01, 4.0824834e-01, 7.0710671e-01],
                        [5.7735026e-01, 4.0824822e-01, -7.0710683e-01]])
  np.testing.assert_allclose(m, reference, atol=1e-6)
  np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-6)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  np.testing.assert_allclose(controllable.couple(controllable.decouple(x)), x, atol=1e-6)
  np.testing.assert_allclose(controllable.decouple(x)[..., 0], np.sqrt(3) * x.mean(-1), atol=1e-5)


def test_exact_classifier_is_the_noised_mixture_posterior():
  sde = make_sde('vpsde', 10)
  x = 3. * jax.random.normal(jax.random.PRNGKey(0), (16, 2))
  t = jax.random.uniform(jax.random.PRNGKey(1), (16,), minval=1e-3, maxval=1.)
  expected = jnp.stack([jax.nn.log_softmax(gaussian_mixture.marginal(sde, MIXTURE, ti).component_log_probs(xi))
                        for xi, ti in zip(x, t)])
  np.testing.assert_allclose(jax.nn.log_softmax(mixture_logits_fn(sde, MIXTURE)(x, t)), expected, atol=1e-4)


# Labels in proportions unlike the mixture's weights (0.5, 0.3, 0.2), so that the weights test the labels.
CLASS_FREQUENCIES = np.array([0.2, 0.3, 0.5])


def _guided_samples(sde_name, config, scale, n=N_SAMPLES, steps=250, exact_latents=False):
  """Samples guided to labels in ``CLASS_FREQUENCIES``; with ``exact_latents``, started from each
  label's component noised to time T (a(T) μ_y + √(a(T)² s² + σ(T)²) z) instead of the prior, so that a
  deterministic flow is exact up to its solver's error."""
  sde = make_sde(sde_name, steps)
  y = np.repeat(np.arange(3), (CLASS_FREQUENCIES * n).astype(int))
  score = controllable.guided_score_fn(gaussian_mixture.isotropic_score_fn(sde, MIXTURE),
                                       mixture_logits_fn(sde, MIXTURE), y, scale)
  sampler = sampling.get_sampling_fn(config, sde, (n, 2), eps=EPS[sde_name])
  z = None
  if exact_latents:
    scale_T, std_T = (float(c[0]) for c in sde.marginal_coeffs(jnp.full((1,), sde.T)))
    z = (scale_T * np.asarray(MIXTURE.means)[y] + np.sqrt(scale_T**2 * STD**2 + std_T**2)
         * np.asarray(jax.random.normal(jax.random.PRNGKey(1), (n, 2))))
  samples, _ = sampler(jax.random.PRNGKey(0), score, z=None if z is None else jnp.asarray(z, jnp.float32))
  return np.asarray(samples), y


def assert_in_their_class_components(samples, y) -> None:
  """Every sample in its label's component; the samples match the mixture reweighted to the label
  frequencies within Z_TOL standard errors."""
  labels = np.asarray(jax.vmap(MIXTURE.component_log_probs)(jnp.asarray(samples))).argmax(1)
  assert np.mean(labels == y) > 0.999
  target = gaussian_mixture.isotropic_mixture(CLASS_FREQUENCIES, MIXTURE.means, [STD] * 3)
  z = mixture_z_scores(samples, target, STD)
  assert z['outliers'] < 1e-3, z
  assert max(z['weight'], z['mean'], z['var'], z['cov']) < Z_TOL, z


@pytest.mark.parametrize('sde_name,method,predictor,corrector', [
    ('vesde', 'pc', 'reverse_diffusion', 'langevin'),
    ('vpsde', 'pc', 'euler_maruyama', 'none'),
    ('subvpsde', 'pc', 'reverse_diffusion', 'none'),
    ('vpsde', 'dpm_solver++', 'reverse_diffusion', 'none'),
    ('subvpsde', 'heun', 'reverse_diffusion', 'none')])
def test_class_guidance_samples_the_class_component(sde_name, method, predictor, corrector):
  """w = 1 with the exact score and classifier: every sample lies in its class's component and the
  samples match the mixture reweighted to the label frequencies (weights, means, covariances within
  5 SE; 10,000 samples; PC N = 250; dpm_solver++ and heun 64 steps). Achieved max |z|: 1.9 VE,
  1.4 VP, 1.3 sub-VP (PC), 2.2 VP (dpm_solver++); every sample in its own class.

  The deterministic samplers are tested on VP-type SDEs: under VE the prior N(0, σ_max² I) differs from
  p_T in its mean by a(T) μ_y = μ_y, which the probability-flow map carries to a bias of μ_y s/σ_max ≈
  0.04 in the class means (5 SE at this sample size), with or without guidance."""
  samples, y = _guided_samples(sde_name, sampling_config(method, predictor, corrector, num_steps=64), 1.)
  assert_in_their_class_components(samples, y)


def test_zero_guidance_is_unconditional():
  """w = 0: the labels are ignored and the samples follow the unconditional mixture."""
  samples, _ = _guided_samples('vesde', sampling_config(), 0.)
  z = mixture_z_scores(samples, MIXTURE, STD)
  assert z['outliers'] < 1e-3, z
  assert max(z['weight'], z['mean'], z['var'], z['cov']) < Z_TOL, z


def test_labels_and_scale_are_jit_arguments():
  """New labels and guidance scales reuse the compiled sampler."""
  sde = make_sde('vesde', 5)
  traces = []
  exact = gaussian_mixture.isotropic_score_fn(sde, MIXTURE)

  def score(x, t):
    traces.append(1)
    return exact(x, t)
  logits = mixture_logits_fn(sde, MIXTURE)
  sampler = sampling.get_sampling_fn(sampling_config(), sde, (4, 2), eps=EPS['vesde'])
  for y, scale in [([0, 1, 2, 0], 1.), ([2, 2, 1, 0], 3.)]:
    sampler(jax.random.PRNGKey(0), controllable.guided_score_fn(score, logits, np.array(y), scale))
  assert len(traces) == 2  # one trace each for the corrector and predictor, in one compilation
  with pytest.raises(ValueError, match='integer'):
    controllable.guided_score_fn(score, logits, np.zeros((4,), np.float32))


@pytest.mark.parametrize('sde_name', ['vesde', 'vpsde'])
def test_ode_class_guidance_samples_the_class_component(sde_name):
  """The adaptive ODE sampler solves each sample separately under ``vmap``; the guided score's labels
  are per-sample conditions (``sampling.ConditionalScore``), split so that each solve sees its own. At
  w = 1 every sample lies in its own class's component and the samples match the mixture reweighted to
  the label frequencies within 5 SE (3,000 samples, dopri5 at the default tolerances). The flow starts
  from each label's exact time-T marginal, not the prior, whose mean bias under VE (see above) would be
  3-5 SE here. Achieved max |z|: 1.5 VE, 1.5 VP."""
  samples, y = _guided_samples(sde_name, sampling_config('ode'), 1., n=3000, exact_latents=True)
  assert_in_their_class_components(samples, y)


def test_conditions_must_match_the_batch():
  """Labels for another batch size are refused with an error saying what to do, by the per-sample ODE
  solves and by a batched sampler alike, instead of being broadcast over the batch."""
  sde = make_sde('vpsde', 5)
  score = gaussian_mixture.isotropic_score_fn(sde, MIXTURE)
  guided = controllable.guided_score_fn(score, mixture_logits_fn(sde, MIXTURE), np.array([0, 1, 2]))
  for method, message in [('ode', 'one row per sample'), ('pc', 'holds class labels for 3 samples')]:
    sampler = sampling.get_sampling_fn(sampling_config(method), sde, (4, 2), eps=EPS['vpsde'])
    with pytest.raises(ValueError, match=message):
      sampler(jax.random.PRNGKey(0), guided)


# ------------------------------------------------------------------------------------------------
# Inpainting and colorization of Gaussian data.


class Gaussian:
  """N(μ, Σ) over D flat coordinates, its exact marginal score under an SDE (no solves: Σ = V Λ Vᵀ) and
  the closed-form conditional of the unknown coordinates given the known ones."""

  def __init__(self, mean, cov):
    self.mean = np.asarray(mean, np.float64)
    self.cov = np.asarray(cov, np.float64)
    self.lam, self.vecs = np.linalg.eigh(self.cov)

  def score_fn(self, sde):
    vecs, lam, mean = (jnp.asarray(a, jnp.float32) for a in (self.vecs, self.lam, self.mean))

    def score(x, t):
      flat = x.reshape(x.shape[0], -1)
      scale, std = sde.marginal_coeffs(t)
      d = (flat - scale[:, None] * mean) @ vecs
      return (-(d / (scale[:, None]**2 * lam + std[:, None]**2)) @ vecs.T).reshape(x.shape)
    return score

  def conditional(self, known, mask):
    k, u = mask == 1, mask == 0
    gain = self.cov[np.ix_(u, k)] @ np.linalg.inv(self.cov[np.ix_(k, k)])
    return (self.mean[u] + gain @ (known[k] - self.mean[k]),
            self.cov[np.ix_(u, u)] - gain @ self.cov[np.ix_(k, u)])


def conditional_errors(samples, mean, cov):
  """(mean error, covariance error) in units of the true conditional sds, and their standard errors."""
  n = len(samples)
  sd = np.sqrt(np.diag(cov))
  sample_cov = np.cov(samples, rowvar=False)
  sample_sd = np.sqrt(np.diag(sample_cov))
  mean_err = (samples.mean(0) - mean) / sd
  cov_err = (sample_cov - cov) / np.outer(sd, sd)
  mean_se = sample_sd / np.sqrt(n) / sd
  cov_se = np.sqrt((np.outer(sample_sd**2, sample_sd**2) + sample_cov**2) / n) / np.outer(sd, sd)
  return mean_err, cov_err, mean_se, cov_se


# Strongly correlated 4-D data as 2×2 images; the lower row is known.
CORRELATED = Gaussian([0.5, -0.5, 1., 0.], (lambda a: a @ a.T)(np.array(
    [[1., 0, 0, 0], [0.8, 0.6, 0, 0], [0.6, 0.3, 0.5, 0], [-0.5, 0.4, 0.2, 0.6]])))
INDEPENDENT = Gaussian([0.5, -0.5, 1., 0.], np.diag([1., 0.36, 0.5, 0.8]))
LOWER_ROW = np.array([0., 0., 1., 1.])
KNOWN_VALUES = np.array([0., 0., 2., -1.])


def _inpaint(data, sde_name, config, n, steps, known=KNOWN_VALUES):
  """Inpaints the upper row given ``known`` (4,) or per sample (n, 4); checks the lower row is returned
  exactly and returns the upper row (n, 2)."""
  sde = make_sde(sde_name, steps)
  shape = (n, 2, 2, 1)
  inpaint = controllable.get_inpainter(config, sde, shape, eps=EPS[sde_name])
  known = np.broadcast_to(np.asarray(known, np.float32).reshape(-1, 4), (n, 4))
  samples, nfe = inpaint(jax.random.PRNGKey(0), data.score_fn(sde), known.reshape(shape),
                         LOWER_ROW.reshape(1, 2, 2, 1))
  samples = np.asarray(samples).reshape(n, 4)
  np.testing.assert_array_equal(samples[:, LOWER_ROW == 1], known[:, LOWER_ROW == 1])
  return samples[:, LOWER_ROW == 0], nfe


@pytest.mark.parametrize('sde_name,method,predictor,corrector', [
    ('vesde', 'pc', 'reverse_diffusion', 'none'),
    ('vpsde', 'pc', 'euler_maruyama', 'langevin'),
    ('subvpsde', 'heun', 'reverse_diffusion', 'none'),
    ('vpsde', 'dpm_solver++', 'reverse_diffusion', 'none'),
    ('vesde', 'ode', 'reverse_diffusion', 'none')])
def test_inpainting_independent_parts_is_exact(sde_name, method, predictor, corrector):
  """When the unknown part is independent of the known one, its conditional is its marginal and the
  replacement method is exact for every sampler: means and variances within 5 SE (4,000 samples, each
  with its own known values; PC N = 250, heun and dpm_solver++ 64 steps, ode adaptive), off-diagonal
  covariance within 5 SE; the known part returned exactly."""
  known = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (4000, 4))) * 2.
  samples, _ = _inpaint(INDEPENDENT, sde_name, sampling_config(method, predictor, corrector, num_steps=64),
                        4000, 250, known)
  mean_err, cov_err, mean_se, cov_se = conditional_errors(
      samples, *INDEPENDENT.conditional(KNOWN_VALUES, LOWER_ROW))
  assert np.all(np.abs(mean_err) < Z_TOL * mean_se), (mean_err, mean_se)
  assert np.all(np.abs(cov_err) < Z_TOL * cov_se), (cov_err, cov_se)


# (sde, method, predictor, corrector) -> measured |mean error| and |covariance error| bounds (sd units,
# 20,000 samples, N = 1,000; the table in the module docstring, rounded up).
ENVELOPES = {
    ('vesde', 'pc', 'reverse_diffusion', 'langevin'): (0.01, 0.025),
    ('vpsde', 'pc', 'euler_maruyama', 'none'): (1.16, 0.77),
    ('vesde', 'dpm_solver++', 'reverse_diffusion', 'none'): (1.63, 1.67),
    ('vpsde', 'heun', 'reverse_diffusion', 'none'): (1.61, 1.73),
    ('vpsde', 'ode', 'reverse_diffusion', 'none'): (1.67, 1.54),
}


@pytest.mark.parametrize('case', list(ENVELOPES), ids='-'.join)
def test_inpainting_correlated_gaussian_within_measured_envelope(case):
  """Correlated data: each sampler's error against the closed-form conditional stays within its measured
  envelope + 5 SE (4,000 samples; PC at N = 1,000 steps, heun and dpm_solver++ at the default 18 steps,
  ode adaptive at the default tolerances)."""
  sde_name, method, predictor, corrector = case
  samples, _ = _inpaint(CORRELATED, sde_name, sampling_config(method, predictor, corrector), 4000, 1000)
  mean_err, cov_err, mean_se, cov_se = conditional_errors(
      samples, *CORRELATED.conditional(KNOWN_VALUES, LOWER_ROW))
  mean_bound, cov_bound = ENVELOPES[case]
  assert np.all(np.abs(mean_err) < mean_bound + Z_TOL * mean_se), (mean_err, mean_se)
  assert np.all(np.abs(cov_err) < cov_bound + Z_TOL * cov_se), (cov_err, cov_se)


def test_inpainter_returns_the_denoised_mean():
  """Point-mass data at c: the last reverse-diffusion step's mean is c to ~1e-4 (σ(eps) ≈ σ_min), its
  sample is c + σ_min z. The inpainter returns the mean (error < 1e-3) with noise_removal, the noisy
  sample without it (error ~ σ_min = 0.01); the reference returned the noisy one in both cases."""
  sde = make_sde('vesde', 10)
  c = jnp.array([1., -2., 0.5, 3.])

  def point_mass_score(x, t):
    scale, std = sde.marginal_coeffs(t)
    return -(x - scale[:, None] * c) / std[:, None]**2
  known = jnp.broadcast_to(c, (64, 4))
  mask = jnp.array([1., 1., 0., 0.])
  errors = {}
  for denoise in (True, False):
    config = sampling_config(corrector='none')
    config.sampling.noise_removal = denoise
    inpaint = controllable.get_inpainter(config, sde, (64, 4), eps=EPS['vesde'])
    samples, nfe = inpaint(jax.random.PRNGKey(0), point_mass_score, known, mask)
    assert nfe == 10
    np.testing.assert_array_equal(samples[:, :2], known[:, :2])
    errors[denoise] = np.abs(np.asarray(samples[:, 2:] - c[2:]))
  assert errors[True].max() < 1e-3
  assert 0.005 < errors[False].std() < 0.02


def test_inpainting_errors():
  sde = make_sde('vesde', 5)
  inpaint = controllable.get_inpainter(sampling_config(), sde, (4, 2), eps=EPS['vesde'])
  score = gaussian_mixture.isotropic_score_fn(sde, MIXTURE)
  with pytest.raises(ValueError, match='0 .unknown. and 1 .known.'):
    inpaint(jax.random.PRNGKey(0), score, jnp.zeros((4, 2)), jnp.full((2,), 0.5))
  with pytest.raises(ValueError, match='known has shape'):
    inpaint(jax.random.PRNGKey(0), score, jnp.zeros((2, 2)), jnp.ones((2,)))
  with pytest.raises(ValueError, match='RGB'):
    controllable.get_colorizer(sampling_config(), sde, (4, 2, 2, 1))


# 3-channel data over 2 pixels (6 coordinates), channels correlated as in natural images.
COLOUR = Gaussian([0.2, 0.4, 0.6, 0.3, 0.3, 0.5], (lambda a: a @ a.T)(np.array(
    [[0.5, 0, 0, 0, 0, 0], [0.4, 0.2, 0, 0, 0, 0], [0.35, 0.1, 0.15, 0, 0, 0],
     [0.3, 0.05, 0.02, 0.3, 0, 0], [0.25, 0.1, 0.03, 0.25, 0.15, 0], [0.2, 0.05, 0.1, 0.2, 0.1, 0.2]])))


def test_colorization_of_gaussian_data():
  """Colorizing 3-channel Gaussian data (PC, reverse diffusion + Langevin, VE, N = 1,000, 4,000 samples):
  the channel mean is the grey input exactly, and the chroma coordinates u = x M (2 per pixel) match
  their closed-form conditional given the grey levels within the measured envelope + 5 SE."""
  sde = make_sde('vesde', 1000)
  n = 4000
  grey = np.array([0.5, 0.2])
  colorize = controllable.get_colorizer(sampling_config(), sde, (n, 1, 2, 3), eps=EPS['vesde'])
  samples, nfe = colorize(jax.random.PRNGKey(0), COLOUR.score_fn(sde),
                          np.broadcast_to(grey.reshape(1, 1, 2, 1), (n, 1, 2, 1)))
  assert nfe == 2000
  samples = np.asarray(samples, np.float64)
  np.testing.assert_allclose(samples.mean(-1), np.broadcast_to(grey.reshape(1, 1, 2), (n, 1, 2)), atol=1e-5)
  # The data in decoupled coordinates: u = (I_2 ⊗ M)ᵀ x, Gaussian; the grey channels (√3 grey) are known.
  rotation = np.kron(np.eye(2), controllable.COLORIZATION_MATRIX.astype(np.float64))
  decoupled = Gaussian(rotation.T @ COLOUR.mean, rotation.T @ COLOUR.cov @ rotation)
  mask = np.array([1., 0., 0., 1., 0., 0.])
  known = np.zeros(6)
  known[mask == 1] = np.sqrt(3) * grey
  u = samples.reshape(n, 6) @ rotation
  mean_err, cov_err, mean_se, cov_se = conditional_errors(u[:, mask == 0], *decoupled.conditional(known, mask))
  assert np.all(np.abs(mean_err) < 0.05 + Z_TOL * mean_se), (mean_err, mean_se)
  assert np.all(np.abs(cov_err) < 0.05 + Z_TOL * cov_se), (cov_err, cov_se)


# ------------------------------------------------------------------------------------------------
# The classifier's training (--mode=train_classifier) and --mode=sample with a condition, on digits
# with tiny stand-ins (a per-pixel affine score network, a 1-block classifier, 10 sampling steps).


def _tiny_digits_config():
  config = digits_ncsnpp_continuous.get_config()
  config.model.num_scales = 10
  config.training.batch_size = 16
  config.eval.batch_size = 100
  config.training.n_iters = 2
  config.training.log_freq = config.training.eval_freq = 1
  config.training.snapshot_freq = config.training.snapshot_freq_for_preemption = 1
  config.classifier.channel_multiplier = 1
  config.classifier.embedding_dim = 16
  config.classifier.embedding_size = 8
  config.classifier.eval_times = (0.1, 1.)
  return config


def _pixel_score_checkpoint(monkeypatch, config):

  class PixelScore(nn.Module):
    @nn.compact
    def __call__(self, x, labels, train=False):
      return nn.Dense(x.shape[-1])(x) - x / labels.reshape(-1, 1, 1, 1)**2
  model = PixelScore()
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32), np.ones((1,)))
  monkeypatch.setattr(mutils, 'create_model', lambda cfg: model)
  monkeypatch.setattr(checkpointing, 'load_variables', lambda *args, **kwargs: (variables, 7))


@pytest.mark.slow
def test_train_classifier_resumes_and_reports_accuracy_per_noise_level(tmp_path):
  config = _tiny_digits_config()
  state = classifier_training.train_classifier(config, str(tmp_path))
  assert int(state.step) == 2
  config.training.n_iters = 3
  resumed = classifier_training.train_classifier(config, str(tmp_path))
  assert int(resumed.step) == 3
  with open(tmp_path / 'classifier' / 'metrics.jsonl', encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  accuracies = [r for r in records if 'eval_accuracy_t0.1' in r]
  assert [r['step'] for r in accuracies] == [1, 2, 3]
  assert all(0 <= r['eval_accuracy_t1'] <= 1 for r in accuracies)
  assert not config.data.labels  # the caller's config is left as it was


@pytest.mark.slow
def test_sample_inpaint_and_class_conditions(tmp_path, monkeypatch):
  """--mode=sample with a condition writes its npz and side-by-side PNG; inpainting keeps the known upper
  half of the test digits (to uint8 rounding); class sampling loads the newest classifier. (Colorization
  needs RGB data: its CLI path is the inpainting one with ``get_colorizer``.)"""
  config = _tiny_digits_config()
  _pixel_score_checkpoint(monkeypatch, config)
  config.sampling.condition = 'inpaint'
  out = generate.generate(config, str(tmp_path), num_samples=8, batch_size=8)
  saved = np.load(os.path.join(out, 'conditional_0.npz'))
  assert saved['samples'].shape == (8, 8, 8, 1)
  np.testing.assert_array_equal(saved['mask'][:4], 1.)
  np.testing.assert_array_equal(saved['mask'][4:], 0.)
  np.testing.assert_allclose(saved['samples'][:, :4] / 255., saved['inputs'][:, :4], atol=1 / 255)
  assert Image.open(os.path.join(out, 'conditional.png')).size[0] > 0

  classifier_training.train_classifier(config, str(tmp_path))
  config.sampling.condition = 'class'
  config.sampling.guidance_scale = 2.
  out = generate.generate(config, str(tmp_path), num_samples=8, batch_size=8)
  saved = np.load(os.path.join(out, 'conditional_0.npz'))
  np.testing.assert_array_equal(saved['labels'], np.arange(8))
  assert np.all(np.isfinite(saved['samples']))

  config.sampling.condition = 'bogus'
  with pytest.raises(ValueError, match='sampling.condition'):
    generate.generate(config, str(tmp_path), num_samples=8, batch_size=8)


def test_condition_flags_override_config_keys():
  """main.py's --class_label, --guidance_scale, --inpaint.input and --inpaint.mask set their
  config.sampling keys and imply the condition; flags of two conditions, or a config asking for another
  condition, are refused."""
  import main  # pylint: disable=import-outside-toplevel  (defines the absl flags)
  no_flags = dict.fromkeys(main.CONDITION_FLAGS)
  config = sampling_config()
  main.apply_condition_flags(config, no_flags)
  assert config.sampling.condition == 'none' and config.sampling.class_label == -1
  main.apply_condition_flags(config, {**no_flags, 'class_label': 3, 'guidance_scale': 2.})
  assert (config.sampling.condition, config.sampling.class_label, config.sampling.guidance_scale) == (
      'class', 3, 2.)
  config = sampling_config()
  main.apply_condition_flags(config, {**no_flags, 'inpaint.input': 'in.npy', 'inpaint.mask': 'center'})
  assert (config.sampling.condition, config.sampling.condition_input, config.sampling.inpaint_mask) == (
      'inpaint', 'in.npy', 'center')
  with pytest.raises(ValueError, match='config.sampling.condition=.class.*sets .inpaint.'):
    main.apply_condition_flags(config, {**no_flags, 'class_label': 1})
  with pytest.raises(ValueError, match='different conditions'):
    main.apply_condition_flags(sampling_config(), {**no_flags, 'class_label': 1, 'inpaint.mask': 'center'})


def test_named_masks():
  lower = generate.named_mask('lower_half', 4, 4)
  np.testing.assert_array_equal(lower, [[1] * 4] * 2 + [[0] * 4] * 2)
  center = generate.named_mask('center', 4, 4)
  assert center.sum() == 12 and center[1:3, 1:3].sum() == 0
  with pytest.raises(ValueError, match='inpaint_mask'):
    generate.named_mask('diagonal', 4, 4)


def test_labels_and_colorization_on_mock_cifar10():
  """config.data.labels adds each example's TFDS label to the batches (digits: sklearn's targets), and
  the colorizer runs on CIFAR-10-shaped images of the mock data path, keeping their grey levels (a
  function check with a Gaussian score and 10 PC steps; no quality claim)."""
  config = cifar10.get_config()
  config.eval.batch_size = 4
  config.data.labels = True
  config.model.num_scales = 10
  with tfds.testing.mock_data(num_examples=4):
    raw = tfds.data_source('cifar10', split='test')
    expected = [int(raw[i]['label']) for i in range(4)]
    batch = next(datasets.get_eval_iterator(config, 'test'))
  assert batch['label'].dtype == np.int32 and batch['label'].tolist() == expected
  digits = digits_ncsnpp_continuous.get_config()
  digits.data.labels = True
  first = next(datasets.get_eval_iterator(digits, 'test'))
  assert first['label'].shape == (100,) and set(first['label'].tolist()) <= set(range(10))

  sde = make_sde('vesde', 10)

  def score(x, t):  # pixels N(0.5, 0.1²), independent
    scale, std = sde.marginal_coeffs(t)
    return -(x - 0.5 * scale[:, None, None, None]) / (0.01 * scale**2 + std**2)[:, None, None, None]
  colorize = controllable.get_colorizer(config, sde, (4, 32, 32, 3), eps=EPS['vesde'])
  grey = batch['image'].mean(-1, keepdims=True)
  samples, nfe = colorize(jax.random.PRNGKey(0), score, grey)
  assert samples.shape == (4, 32, 32, 3) and nfe == 20
  np.testing.assert_allclose(np.asarray(samples).mean(-1, keepdims=True), grey, atol=1e-5)
