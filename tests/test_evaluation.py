"""FID / IS / KID against closed forms, the digits feature network, and the resumable sample evaluation."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import scipy.linalg

from scoresde import datasets
from scoresde.evaluation import sample_quality
from scoresde.evaluation import metrics
from scoresde.infra import images
from scoresde import sde_lib
from configs import default_cifar10_configs
from scoresde.evaluation import digits_classifier, inception
from scripts import train_digits_classifier


def _random_cov(rng, d):
  a = rng.standard_normal((d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------------------------------
# FID


def test_frechet_distance_matches_scipy_sqrtm_formula():
  rng = np.random.default_rng(0)
  d = 6
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  cov1, cov2 = _random_cov(rng, d), _random_cov(rng, d)
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2)
              - 2. * np.trace(scipy.linalg.sqrtm(cov1 @ cov2)).real)
  assert metrics.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_commuting_and_singular_closed_form():
  # Diagonal covariances: ‖Δμ‖² + Σ (√a − √b)². A rank-deficient Σ₁ (as with fewer samples than
  # dimensions) needs no ε offset.
  a, b = np.array([1., 0., 4.]), np.array([4., 1., 9.])
  mu1, mu2 = np.array([0., 1., 2.]), np.array([1., 1., 0.])
  expected = 1. + 4. + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-12)


def test_fid_of_gaussian_feature_sets_equals_closed_form():
  # Features drawn from N(μ₁, Σ₁) and N(μ₂, Σ₂): the sample FID converges to the closed form at rate
  # O(1/√N); with N = 200,000 in 4-D the error is ~0.01 (bound 0.05 ≈ 5 standard deviations).
  rng = np.random.default_rng(1)
  d, n = 4, 200_000
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  cov1, cov2 = _random_cov(rng, d), _random_cov(rng, d)
  x = rng.multivariate_normal(mu1, cov1, size=n)
  y = rng.multivariate_normal(mu2, cov2, size=n)
  exact = metrics.frechet_distance(mu1, cov1, mu2, cov2)
  assert exact > 1.
  assert metrics.fid_from_features(x, y) == pytest.approx(exact, abs=0.05)


def test_fid_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((500, 64)) * rng.uniform(0.1, 3., 64)
  assert abs(metrics.fid_from_features(x, x)) < 1e-8
  # More dimensions than samples: singular covariance; the result is real and 0 up to round-off in
  # the square roots of the zero eigenvalues (√1e-16 each): 1e-7 of Tr Σ₁ + Tr Σ₂ (≈ 256 here).
  z = rng.standard_normal((50, 128))
  assert abs(metrics.fid_from_features(z, z)) < 1e-7 * 2 * np.trace(np.cov(z, rowvar=False))


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='mismatched'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------------------
# IS


def test_inception_score_uniform_and_confident_extremes():
  k, n = 10, 1000
  assert metrics.inception_score(np.zeros((n, k)), splits=10) == pytest.approx((1., 0.), abs=1e-12)
  confident = 1e4 * np.eye(k)[np.arange(n) % k]  # one-hot, every class equally often
  mean, std = metrics.inception_score(confident, splits=10)
  assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0., abs=1e-9)
  assert metrics.inception_score(confident, splits=1)[0] == pytest.approx(k, rel=1e-9)


def test_inception_score_two_class_closed_form():
  # Half the samples predict (a, 1-a), half (1-a, a): p(y) is uniform, so
  # IS = exp(KL) = exp(log 2 − H(a)) with H the binary entropy.
  a = 0.8
  logits = np.log(np.array([[a, 1 - a], [1 - a, a]] * 50))
  entropy = -(a * np.log(a) + (1 - a) * np.log(1 - a))
  assert metrics.inception_score(logits, splits=1)[0] == pytest.approx(np.exp(np.log(2.) - entropy))
  assert metrics.inception_score(logits, splits=5)[0] == pytest.approx(np.exp(np.log(2.) - entropy))


def test_inception_score_split_validation():
  with pytest.raises(ValueError, match='splits'):
    metrics.inception_score(np.zeros((5, 3)), splits=6)


# ----------------------------------------------------------------------------------------------------
# KID


def _poly2_expectation(a, sa, b, sb, d, c=1.):
  """E (xᵀy/d + c)² for independent x ~ N(a, Sa), y ~ N(b, Sb)."""
  second = (a @ b) ** 2 + a @ sb @ a + b @ sa @ b + np.trace(sa @ sb)
  return second / d ** 2 + 2. * c * (a @ b) / d + c ** 2


def test_mmd2_unbiased_matches_closed_form_expectations():
  # Averaged over many independent draws, the estimator's mean matches the exact MMD² — for the linear
  # kernel (‖μ₁ − μ₂‖² / d) and the quadratic kernel (closed-form Gaussian moments) — within 4 standard
  # errors of the average; the biased V-statistic (diagonal kept) is measurably off for the same sets.
  rng = np.random.default_rng(3)
  d, m, n, reps = 3, 20, 30, 2000
  a, b = np.array([0.5, 0., -0.5]), np.array([0., 0.3, 0.])
  sa, sb = np.diag([1., 0.5, 2.]), np.diag([1.5, 1., 0.5])
  exact = {1: np.sum((a - b) ** 2) / d,
           2: (_poly2_expectation(a, sa, a, sa, d) + _poly2_expectation(b, sb, b, sb, d)
               - 2. * _poly2_expectation(a, sa, b, sb, d))}
  for degree in (1, 2):
    est, biased = [], []
    for _ in range(reps):
      x = rng.multivariate_normal(a, sa, size=m)
      y = rng.multivariate_normal(b, sb, size=n)
      est.append(metrics.mmd2_unbiased(x, y, degree=degree))
      kxx = metrics.polynomial_kernel(x, x, degree)
      kyy = metrics.polynomial_kernel(y, y, degree)
      biased.append(kxx.mean() + kyy.mean() - 2 * metrics.polynomial_kernel(x, y, degree).mean())
    stderr = np.std(est) / np.sqrt(reps)
    assert abs(np.mean(est) - exact[degree]) < 4 * stderr, (degree, np.mean(est), exact[degree], stderr)
    assert abs(np.mean(biased) - exact[degree]) > 10 * stderr


def test_kid_is_unbiased_for_equal_distributions_and_its_stderr_is_honest():
  # Same distribution: KID (cubic kernel) has expectation exactly 0, whatever the sample size. Over
  # many seeds the mean of the estimates is 0 within 4 standard errors, and the reported per-run
  # standard error matches the spread of the estimates across runs (ratio within 25 %).
  rng = np.random.default_rng(4)
  kids, stderrs = [], []
  for seed in range(300):
    x = rng.standard_normal((120, 8)) + 1.
    y = rng.standard_normal((90, 8)) + 1.
    kid, stderr = metrics.kernel_inception_distance(x, y, block_size=30, seed=seed)
    kids.append(kid)
    stderrs.append(stderr)
  spread = np.std(kids)
  assert abs(np.mean(kids)) < 4 * spread / np.sqrt(len(kids))
  assert np.sqrt(np.mean(np.square(stderrs))) == pytest.approx(spread, rel=0.25)
  shifted = metrics.kernel_inception_distance(rng.standard_normal((400, 8)) + 2.,
                                                 rng.standard_normal((400, 8)) + 1., block_size=100)
  assert shifted[0] > 5 * shifted[1]


def test_kid_needs_enough_samples():
  with pytest.raises(ValueError, match='KID needs'):
    metrics.kernel_inception_distance(np.zeros((3, 2)), np.zeros((10, 2)))


# ----------------------------------------------------------------------------------------------------
# Inception weights (no PyTorch needed; equivalence with pytorch-fid is in test_inception_torch.py)


def test_inception_missing_file_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='pt_inception-2015-12-05-6726825d.pth.*inception_path'):
    inception.load_variables(str(tmp_path / 'nope.pth'))


def test_inception_sha256_is_checked(tmp_path):
  path = tmp_path / inception.FILENAME
  path.write_bytes(b'not the weights')
  with pytest.raises(ValueError, match='SHA-256'):
    inception.load_variables(str(path))


def test_inception_state_dict_keys_are_checked():
  with pytest.raises(ValueError, match='missing'):
    inception.variables_from_state_dict({'fc.weight': np.zeros((1008, 2048)), 'fc.bias': np.zeros(1008)})


def test_bilinear_matrix_matches_half_pixel_convention():
  np.testing.assert_allclose(inception.bilinear_matrix(5, 5), np.eye(5), atol=1e-7)
  w = inception.bilinear_matrix(2, 4)  # sources at -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped)
  np.testing.assert_allclose(w, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], atol=1e-7)
  np.testing.assert_allclose(inception.bilinear_matrix(32, 299).sum(axis=1), 1., atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Digits feature network


def _digits_config(image_size=8):
  config = default_cifar10_configs.get_default_configs()
  config.data.dataset = 'digits'
  config.data.image_size = image_size
  config.data.num_channels = 1
  config.data.num_levels = 17
  config.data.centered = False
  return config


def _split_uint8(split, image_size=8):
  config = _digits_config(image_size)
  return images.to_uint8(datasets.get_source(config, split).load(
      np.arange(datasets.num_examples(config, split))) / 16.)


@pytest.fixture(scope='module')
def digits_extractor():
  return metrics.get_feature_extractor(_digits_config())


@pytest.fixture(scope='module')
def digits_features(digits_extractor):
  return {split: metrics.compute_features(digits_extractor, _split_uint8(split))
          for split in ('train', 'test')}


def test_digits_classifier_test_accuracy_from_committed_weights():
  pixels, labels = train_digits_classifier.split_data('test')
  acc = train_digits_classifier.accuracy(digits_classifier.load_params(), pixels, labels)
  assert acc >= 0.97, acc


def test_digits_classifier_training_is_deterministic():
  first = train_digits_classifier.train(epochs=1)
  second = train_digits_classifier.train(epochs=1)
  jax.tree.map(np.testing.assert_array_equal, first, second)


def test_digits_quality_train_vs_test_is_small_next_to_noise(digits_extractor, digits_features):
  train_f, train_l = digits_features['train']
  test_f, _ = digits_features['test']
  noise = images.to_uint8(np.random.default_rng(0).uniform(size=(1497, 8, 8, 1)))
  noise_f, noise_l = metrics.compute_features(digits_extractor, noise)
  mu, cov = metrics.feature_stats(test_f)
  control = metrics.quality_metrics(train_f, train_l, mu, cov, test_f)
  bad = metrics.quality_metrics(noise_f, noise_l, mu, cov, test_f)
  assert control['fid'] < 10 and bad['fid'] > 20 * control['fid']
  assert control['is'] > 9 and bad['is'] < 3  # 10 balanced, confidently recognised classes vs noise
  assert abs(control['kid']) < 3 * control['kid_stderr']  # same distribution: KID consistent with 0
  assert bad['kid'] > 20 * bad['kid_stderr']


def test_digits_features_are_layout_invariant(digits_extractor, digits_features):
  # An upsampled 16×16 config scores the same digits identically (block means undo the upsampling).
  extractor16 = metrics.get_feature_extractor(_digits_config(16))
  feats16, _ = metrics.compute_features(extractor16, _split_uint8('test', 16))
  np.testing.assert_allclose(feats16, digits_features['test'][0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Resumable evaluation of a checkpoint's samples


class _TinyScore(nn.Module):
  """A stand-in score network (NHWC, ``(x, labels, train)``): one 3×3 convolution."""
  config: object

  @nn.compact
  def __call__(self, x, labels, train=False):
    del labels, train
    return nn.Conv(x.shape[-1], (3, 3))(x)


def _eval_config(num_samples=10, batch_size=4):
  config = _digits_config()
  config.training.sde = 'vesde'
  config.training.continuous = True
  config.model.num_scales = 8
  config.eval.num_samples = num_samples
  config.eval.batch_size = batch_size
  config.sampling.corrector = 'none'
  config.sampling.eps = 1e-5
  return config


@pytest.fixture(scope='module')
def tiny_model():
  config = _eval_config()
  model = _TinyScore(config)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32), None)
  return model, variables, sde_lib.VESDE(0.01, 1., N=config.model.num_scales)


def test_evaluate_samples_exact_count_report_and_resume(tmp_path, tiny_model, monkeypatch):
  model, variables, sde = tiny_model
  config = _eval_config(num_samples=10, batch_size=4)  # 3 rounds: 4 + 4 + 2 kept of 4
  full = sample_quality.evaluate_samples(config, str(tmp_path / 'full'), 3, model, variables, sde,
                                       show_progress=False)
  assert full['num_samples'] == 10 and full['feature_network'] == 'digits_classifier'
  assert full['nfe_mean'] == config.model.num_scales  # reverse diffusion, no corrector
  with open(tmp_path / 'full' / 'report_ckpt_3.json') as f:
    assert json.load(f)['fid'] == full['fid']
  assert os.path.isfile(tmp_path / 'full' / 'samples_ckpt_3.png')
  run_dir = tmp_path / 'full' / 'samples_ckpt_3'
  counts = [len(np.load(run_dir / f'samples_{r}.npz')['samples']) for r in range(3)]
  assert counts == [4, 4, 2]
  assert np.load(run_dir / 'samples_0.npz')['samples'].dtype == np.uint8

  # Preempted after the first round: the rerun samples only the missing rounds and reports the same.
  real_get = sample_quality.sampling.get_sampling_fn
  calls = []

  def flaky_get(*args, **kwargs):
    sampler = real_get(*args, **kwargs)

    def wrapped(*a, **k):
      calls.append(k.get('first_index'))
      if len(calls) == 2 and not flaky_get.resumed:
        raise KeyboardInterrupt('preempted')
      return sampler(*a, **k)
    return wrapped
  flaky_get.resumed = False
  monkeypatch.setattr(sample_quality.sampling, 'get_sampling_fn', flaky_get)
  monkeypatch.setattr(sample_quality, '_SAMPLERS', {})
  with pytest.raises(KeyboardInterrupt):
    sample_quality.evaluate_samples(config, str(tmp_path / 'cut'), 3, model, variables, sde,
                                  show_progress=False)
  flaky_get.resumed = True
  calls.clear()
  sample_quality._SAMPLERS.clear()  # pylint: disable=protected-access  (a fresh process after preemption)
  resumed = sample_quality.evaluate_samples(config, str(tmp_path / 'cut'), 3, model, variables, sde,
                                          show_progress=False)
  assert calls == [4, 8]
  for key in ('fid', 'is', 'is_std', 'is_single_split', 'kid', 'kid_stderr', 'nfe_mean'):
    assert resumed[key] == full[key], key

  other = _eval_config(num_samples=10, batch_size=4)
  other.seed = 7
  with pytest.raises(ValueError, match='other settings.*seed'):
    sample_quality.evaluate_samples(other, str(tmp_path / 'cut'), 3, model, variables, sde,
                                  show_progress=False)


def test_samples_of_a_dequantized_model_are_scored_on_the_data_levels(tmp_path, tiny_model):
  """Trained on (x + u)/L, a model's samples are mapped back to x/(L-1) before FID sees them (and that is
  part of the run's settings); a model trained on the grid keeps its samples' values."""
  model, variables, sde = tiny_model
  levels = {int(v) for v in np.round(np.arange(17) / 16 * 255)}
  saved = {}
  for dequantized in (False, True):
    config = _eval_config(num_samples=4, batch_size=4)
    config.data.uniform_dequantization = dequantized
    sample_quality.evaluate_samples(config, str(tmp_path / str(dequantized)), 0, model, variables, sde,
                                    show_progress=False)
    saved[dequantized] = np.load(tmp_path / str(dequantized) / 'samples_ckpt_0' / 'samples_0.npz')['samples']
  assert set(np.unique(saved[True]).tolist()) <= levels
  assert not set(np.unique(saved[False]).tolist()) <= levels
  with pytest.raises(ValueError, match='other settings.*to_levels'):
    sample_quality.evaluate_samples(_eval_config(num_samples=4, batch_size=4), str(tmp_path / 'True'), 0,
                                    model, variables, sde, show_progress=False)


_FOUR_DEVICE_SCRIPT = """
import os, sys
import jax, numpy as np
sys.path.insert(0, os.getcwd())
assert jax.device_count() == 4, jax.devices()
from scoresde.evaluation import sample_quality
from scoresde import sde_lib
from tests import test_evaluation as t
config = t._eval_config(num_samples=10, batch_size=4)
model = t._TinyScore(config)
variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32), None)
sample_quality.evaluate_samples(config, sys.argv[1], 3, model, variables,
                              sde_lib.VESDE(0.01, 1., N=config.model.num_scales), show_progress=False)
"""


def test_samples_and_features_do_not_depend_on_the_device_count(tmp_path, tiny_model):
  # Sample i comes from fold_in(seed, i); the batch is sharded over 4 CPU devices in a subprocess.
  model, variables, sde = tiny_model
  config = _eval_config(num_samples=10, batch_size=4)
  one = sample_quality.evaluate_samples(config, str(tmp_path / 'one'), 3, model, variables, sde,
                                      show_progress=False)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, '-c', _FOUR_DEVICE_SCRIPT, str(tmp_path / 'four')], check=True, env=env,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
  with open(tmp_path / 'four' / 'report_ckpt_3.json') as f:
    four = json.load(f)
  for r in range(3):
    a = np.load(tmp_path / 'one' / 'samples_ckpt_3' / f'samples_{r}.npz')['samples'].astype(int)
    b = np.load(tmp_path / 'four' / 'samples_ckpt_3' / f'samples_{r}.npz')['samples'].astype(int)
    assert np.abs(a - b).max() <= 1  # float round-off may move a pixel across a rounding boundary
  assert four['fid'] == pytest.approx(one['fid'], rel=1e-3)
  assert four['is'] == pytest.approx(one['is'], rel=1e-3)


def test_compute_dataset_stats_round_trip(tmp_path, digits_extractor, digits_features):
  config = _digits_config()
  config.eval.batch_size = 256
  path = sample_quality.compute_dataset_stats(config, str(tmp_path / 'digits_stats.npz'))
  with np.load(path) as data:
    assert int(data['num_examples']) == 1497 and str(data['split']) == 'train'
    np.testing.assert_allclose(data['pool_3'], digits_features['train'][0], rtol=1e-6, atol=1e-6)
  config.eval.stats_path = path
  reference = sample_quality.load_reference(config, digits_extractor)
  assert reference['source'] == path
  mu, sigma = metrics.feature_stats(digits_features['train'][0])
  np.testing.assert_allclose(reference['mu'], mu, rtol=1e-6)
  np.testing.assert_allclose(reference['sigma'], sigma, rtol=1e-5, atol=1e-8)
  config.data.image_size = 16  # statistics of 8x8 digits do not describe a 16x16 config
  with pytest.raises(ValueError, match='image_size=8'):
    sample_quality.load_reference(config, digits_extractor)


def test_missing_stats_for_image_datasets_say_how_to_compute_them(tmp_path):
  config = default_cifar10_configs.get_default_configs()
  config.eval.stats_path = str(tmp_path / 'none.npz')
  extractor = metrics.FeatureExtractor('inception_v3_fid', lambda x: x, 2048, 1008)
  with pytest.raises(FileNotFoundError, match='--mode=fid_stats'):
    sample_quality.load_reference(config, extractor)


def test_toy_data_is_rejected_before_any_work():
  config = default_cifar10_configs.get_default_configs()
  config.data.dataset = 'gmm'
  with pytest.raises(ValueError, match='enable_sampling=False'):
    sample_quality.evaluate_samples(config, '/nonexistent', 0, None, None, None)
