"""Score-based anomaly detection (scoresde/anomaly.py) against closed forms, and --mode=qa end to end.

With the exact score of Gaussian data N(μ, v I), the DSM residual of a fixed input x at noise level σ has
mean ‖x-μ‖²/w² + D v²/(σ² w²) (w = v + σ²) and, per draw, variance Σ_j 4 m_j² b² + 2 D b⁴ (m = -(x-μ)/w,
b = v / (σ w)); so the K-draw estimate of each input, standardised by these, has mean 0 and variance 1
over many inputs, for clean, scaled and shifted inputs alike, under every SDE (the residual is in data
units). A well-separated Gaussian mixture is, near each mode, that Gaussian.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresde import anomaly
from scoresde import gaussian_mixture
from scoresde import sde_lib

SIGMA = 0.05
SDES = {'ve': lambda: sde_lib.VESDE(0.01, 0.2, 4), 'vp': sde_lib.VPSDE, 'subvp': sde_lib.subVPSDE}


def _standardised(x, mean, variance, sigma, scores, num_draws):
  """(score - exact mean) / exact standard error of a K-draw mean, per input."""
  flat = np.asarray(x, np.float64).reshape(len(x), -1)
  w = variance + sigma**2
  m = -(flat - np.asarray(mean, np.float64).reshape(1, -1)) / w
  b = variance / (sigma * w)
  var = np.sum(4 * m**2 * b**2, axis=1) + 2 * flat.shape[1] * b**4
  expected = anomaly.gaussian_expected_residual(x, mean, variance, sigma)
  return (np.asarray(scores, np.float64) - expected) / np.sqrt(var / num_draws)


def _assert_standard(z):
  n = z.size
  assert abs(z.mean()) < 4 / math.sqrt(n), z.mean()
  assert 0.85 < z.std() < 1.15, z.std()


@pytest.mark.parametrize('sde_name', sorted(SDES))
def test_gaussian_residual_matches_closed_form(sde_name):
  sde = SDES[sde_name]()
  shape, std = (4, 4, 2), 0.1
  mean = np.linspace(-0.5, 0.5, np.prod(shape)).astype(np.float32)
  data = gaussian_mixture.isotropic_mixture([1.], mean[None], [std])
  score_fn = gaussian_mixture.isotropic_score_fn(sde, data)
  n, k = 2000, 8
  clean = np.asarray(data.sample(jax.random.key(0), n)).reshape((n,) + shape)
  inputs = {'clean': clean, 'scaled': mean.reshape(shape) + 2. * (clean - mean.reshape(shape)),
            'shifted': clean + 0.2}
  residual = jax.jit(lambda x, rng: anomaly.dsm_residual(score_fn, sde, x, SIGMA, rng, num_draws=k))
  floor = np.prod(shape) * std**2 / (SIGMA**2 * (std**2 + SIGMA**2))
  for i, (name, x) in enumerate(inputs.items()):
    out = residual(jnp.asarray(x), jax.random.key(i + 1))
    scores = np.asarray(out['score'])
    _assert_standard(_standardised(x, mean, std**2, SIGMA, scores, k))
    if name == 'clean':  # the population mean is the DSM floor D v / (σ² w)
      assert abs(scores.mean() - floor) < 4 * scores.std() / math.sqrt(n)
    else:
      assert scores.mean() > 1.5 * floor, (name, scores.mean(), floor)
    np.testing.assert_allclose(np.asarray(out['per_channel']).sum(-1), scores, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out['map']).reshape(n, -1).sum(-1), scores, rtol=1e-5)
    assert out['per_channel'].shape == (n, 2) and out['map'].shape == (n,) + shape
    assert not np.any(np.asarray(out['non_finite']))


def test_mixture_residual_matches_closed_form_near_each_mode():
  std, dim = 0.3, 16
  data = gaussian_mixture.default_mixture(dim, separation=10., std=std)
  sde = sde_lib.VESDE(0.01, 0.2, 4)
  score_fn = gaussian_mixture.isotropic_score_fn(sde, data)
  n, k = 1500, 8
  comps = np.asarray(jax.random.choice(jax.random.key(3), 3, (n,), p=data.weights))
  means = np.asarray(data.means)[comps]
  clean = means + std * np.asarray(jax.random.normal(jax.random.key(4), (n, dim)))
  for i, x in enumerate((clean, means + 1.5 * (clean - means), clean - 0.1)):
    x = x.reshape(n, 4, 4, 1).astype(np.float32)
    out = anomaly.dsm_residual(score_fn, sde, jnp.asarray(x), SIGMA, jax.random.key(10 + i), num_draws=k)
    flat = x.reshape(n, -1)
    z = np.concatenate([
        _standardised(flat[comps == c], np.asarray(data.means)[c], std**2, SIGMA,
                      np.asarray(out['score'])[comps == c], k) for c in range(3)])
    _assert_standard(z)


def test_false_reject_rate_at_the_calibrated_percentile():
  """Calibrate on n clean scores at the 99.5th percentile; fresh clean inputs are rejected 0.5% of the
  time, within the binomial standard errors of the test set and of the calibration set's threshold."""
  sde = sde_lib.VESDE(0.01, 0.2, 4)
  dim, std = 16, 0.1
  data = gaussian_mixture.isotropic_mixture([1.], np.zeros((1, dim)), [std])
  score_fn = gaussian_mixture.isotropic_score_fn(sde, data)
  residual = jax.jit(lambda x, rng: anomaly.dsm_residual(score_fn, sde, x, SIGMA, rng)['score'])
  n = 20000
  cal = np.asarray(residual(data.sample(jax.random.key(0), n).reshape(n, 4, 4, 1), jax.random.key(1)))
  test = data.sample(jax.random.key(2), n).reshape(n, 4, 4, 1)
  out = anomaly.dsm_residual(score_fn, sde, test, SIGMA, jax.random.key(3))
  threshold = anomaly.threshold_at(cal, 99.5)
  decision, reason = anomaly.decide(out['score'], out['non_finite'], threshold)
  frr = np.mean(decision == anomaly.REJECT)
  p = 0.005
  se = math.sqrt(p * (1 - p) / n + p * (1 - p) / n)
  assert abs(frr - p) < 3 * se, (frr, se)
  assert set(reason[decision == anomaly.REJECT]) == {anomaly.REASON_ABOVE}


def test_profile_score_is_two_sided_and_calibrated():
  """The profile score (Mahalanobis distance of log residuals across σ) on Gaussian data with the exact
  score: fresh clean inputs exceed its leave-one-out threshold 0.5% of the time (within binomial SE);
  inputs pulled towards the mean, which the one-sided residual ranks as *cleaner* than clean data, are
  rejected by it; inputs pushed away are rejected by both."""
  sde = sde_lib.VESDE(0.01, 0.2, 4)
  dim, std, sigmas = 64, 0.1, [0.01, 0.05, 0.1, 0.2]
  data = gaussian_mixture.isotropic_mixture([1.], np.zeros((1, dim)), [std])
  score_fn = gaussian_mixture.isotropic_score_fn(sde, data)
  residuals = jax.jit(lambda x, rng: anomaly.dsm_residuals(score_fn, sde, x, sigmas, rng, num_draws=4)['score'])
  n = 8000
  sample = lambda seed: np.asarray(data.sample(jax.random.key(seed), n)).reshape(n, 8, 8, 1)
  cal_scores = np.asarray(residuals(sample(0), jax.random.key(1)), np.float64)
  cal = anomaly.calibrate(cal_scores, sigmas, SIGMA, 99.5, 4, 'h')
  profile = lambda s: anomaly.profile_score(s, cal.profile_mean, cal.profile_precision)
  fresh = np.asarray(residuals(sample(2), jax.random.key(3)), np.float64)
  p = 0.005
  frr = np.mean(profile(fresh) > cal.profile_threshold)
  assert abs(frr - p) < 3 * math.sqrt(2 * p * (1 - p) / n), frr
  # In-sample distances are smaller than fresh ones; the leave-one-out ones are not.
  loo = anomaly.leave_one_out_profile_scores(cal_scores)
  assert profile(cal_scores).mean() < loo.mean() and abs(loo.mean() - profile(fresh).mean()) < 0.1
  shrunk = np.asarray(residuals(0.5 * sample(4), jax.random.key(5)), np.float64)
  assert np.mean(shrunk[1] > cal.threshold) < 0.01  # the recipe's score accepts them all
  assert np.mean(profile(shrunk) > cal.profile_threshold) > 0.95
  stretched = np.asarray(residuals(2. * sample(6), jax.random.key(7)), np.float64)
  assert np.mean(stretched[1] > cal.threshold) > 0.95 and np.mean(profile(stretched) > cal.profile_threshold) > 0.95
  scores = cal_scores[:, :3].copy()
  scores[2, 1] = np.inf
  assert np.isinf(profile(scores)[1]) and np.all(np.isfinite(profile(scores)[[0, 2]]))


def test_non_finite_inputs_are_flagged_never_nan():
  sde = sde_lib.VESDE(0.01, 0.2, 4)
  data = gaussian_mixture.isotropic_mixture([1.], np.zeros((1, 12)), [0.1])
  score_fn = gaussian_mixture.isotropic_score_fn(sde, data)
  x = np.array(data.sample(jax.random.key(0), 4)).reshape(4, 2, 2, 3)
  x[1, 0, 1, 2] = np.nan
  x[2, 1, 1, 0] = np.inf
  x[3] = -np.inf
  out = jax.jit(lambda x: anomaly.dsm_residuals(score_fn, sde, x, [0.01, 0.05, 0.2], jax.random.key(1)))(x)
  assert np.asarray(out['non_finite']).tolist() == [False, True, True, True]
  for key in ('score', 'score_se', 'per_channel', 'map'):
    assert not np.any(np.isnan(np.asarray(out[key]))), key
  score, per_channel = np.asarray(out['score']), np.asarray(out['per_channel'])
  assert np.all(np.isfinite(score[:, 0])) and np.all(np.isinf(score[:, 1:]))
  # The heat is in the failed channel: the others keep finite scores.
  assert np.isinf(per_channel[:, 1, 2]).all() and np.isfinite(per_channel[:, 1, :2]).all()
  assert np.isinf(per_channel[:, 2, 0]).all() and np.isfinite(per_channel[:, 2, 1:]).all()
  decision, reason = anomaly.decide(score[1], out['non_finite'], threshold=1e30)
  assert decision.tolist() == ['accept', 'reject', 'reject', 'reject']
  assert reason.tolist()[1:] == [anomaly.REASON_NON_FINITE] * 3
  # A score network that itself returns NaN gives +inf, not NaN.
  nan_out = anomaly.dsm_residual(lambda y, t: y * jnp.nan, sde, x[:1], SIGMA, jax.random.key(2))
  assert np.isinf(np.asarray(nan_out['score'])).all()


def test_each_input_has_its_own_noise_whatever_its_batch():
  sde = sde_lib.VPSDE()
  data = gaussian_mixture.isotropic_mixture([1.], np.zeros((1, 4)), [0.2])
  score_fn = gaussian_mixture.isotropic_score_fn(sde, data)
  x = np.asarray(data.sample(jax.random.key(0), 6)).reshape(6, 2, 2, 1)
  rng = jax.random.key(7)
  whole = anomaly.dsm_residual(score_fn, sde, x, 0.1, rng)
  part = anomaly.dsm_residual(score_fn, sde, x[3:], 0.1, rng, index=np.arange(3, 6))
  np.testing.assert_allclose(np.asarray(whole['score'])[3:], np.asarray(part['score']), rtol=1e-5)
  other = anomaly.dsm_residual(score_fn, sde, x, 0.1, jax.random.key(8))
  assert not np.allclose(np.asarray(whole['score']), np.asarray(other['score']))


@pytest.mark.parametrize('sde_name', sorted(SDES))
def test_noise_level_time_inverts_the_noise_to_signal_ratio(sde_name):
  sde = SDES[sde_name]()
  sigmas = np.array([0.01, 0.05, 0.1, 0.2])
  times = sde.noise_level_time(sigmas)
  assert np.all(np.diff(times) > 0) and np.all((times >= 0) & (times <= sde.T))
  np.testing.assert_allclose([sde.noise_to_signal(float(t)) for t in times], sigmas, rtol=1e-5)
  with pytest.raises(ValueError, match='not reached'):
    sde.noise_level_time([1e6])
  with pytest.raises(ValueError, match='positive'):
    sde.noise_level_time([0.])
  if sde_name == 've':
    with pytest.raises(ValueError, match=r'\[0.005\]'):
      sde.noise_level_time([0.005, 0.1])


def test_threshold_and_calibration_json(tmp_path):
  scores = np.arange(1, 1000, dtype=np.float64)  # n = 999: rank ⌈0.995 · 1000⌉ = 995
  assert anomaly.threshold_at(scores, 99.5) == 995.
  assert anomaly.threshold_at(scores[:10], 99.5) == 10.  # too few: the largest
  with pytest.raises(ValueError, match='clean'):
    anomaly.threshold_at(np.array([1., np.inf]), 99.5)
  rng = np.random.default_rng(0)
  multi = np.stack([rng.normal(10, 1, 500), rng.normal(100, 5, 500)])
  cal = anomaly.calibrate(multi, [0.01, 0.05], 0.05, 99.5, 8, 'abc', checkpoint_step=3, split='test')
  assert cal.threshold == anomaly.threshold_at(multi[1], 99.5) and cal.num_examples == 500
  fused = anomaly.fused_score(multi, cal.sigma_means, cal.sigma_stds)
  assert abs(fused.mean()) < 1e-9 and np.mean(fused > cal.fused_threshold) <= 0.005
  # The profile threshold is the ⌈q(n+1)⌉-th of the leave-one-out distances, each under the others' moments.
  keep = np.arange(500) != 7
  alone = anomaly.profile_score(multi[:, [7]], *anomaly.profile_moments(multi[:, keep]))[0]
  loo = anomaly.leave_one_out_profile_scores(multi)
  assert abs(loo[7] - alone) <= 1e-9 * alone
  assert cal.profile_threshold == anomaly.threshold_at(loo, 99.5)
  assert np.isinf(anomaly.fused_score(np.array([[1.], [np.inf]]), [0, 0], [1, 1]))[0]
  path = os.path.join(tmp_path, 'calibration.json')
  anomaly.save_calibration(path, cal)
  assert anomaly.load_calibration(path) == cal
  assert json.load(open(path))['config_hash'] == 'abc'
  with open(path, 'w') as f:
    json.dump({**json.loads(cal.to_json()), 'exec': 'x'}, f)
  with pytest.raises(ValueError, match='exec'):
    anomaly.load_calibration(path)
  with open(path, 'w') as f:
    json.dump({'threshold': 1.}, f)
  with pytest.raises(ValueError, match="missing fields .*'config_hash'"):
    anomaly.load_calibration(path)
  with open(path, 'w') as f:
    json.dump([1, 2], f)
  with pytest.raises(ValueError, match='not a JSON object'):
    anomaly.load_calibration(path)
  with pytest.raises(ValueError, match='not among'):
    anomaly.calibrate(multi, [0.01, 0.05], 0.1, 99.5, 8, 'abc')


# ----------------------------------------------------------------------------------------------------
# --mode=train → calibration → --mode=qa, on tiny user arrays (data.dataset='arrays').


def _tiny_qa_config(data_path):
  from configs.qa import digits  # pylint: disable=import-outside-toplevel
  config = digits.get_config()
  config.data.dataset = 'arrays'
  config.data.path = str(data_path)
  config.data.num_channels = 2
  config.data.holdout_fraction = 0.25
  config.model.nf = 8
  config.model.num_res_blocks = 1
  training = config.training
  training.batch_size, training.n_iters = 8, 2
  training.snapshot_freq = training.snapshot_freq_for_preemption = training.log_freq = 2
  training.eval_freq = 4  # past n_iters: no eval-loss compile
  config.eval.batch_size = 8
  config.qa.num_draws = 2
  config.lock()
  return config


def test_qa_mode_end_to_end(tmp_path):
  from scoresde import datasets  # pylint: disable=import-outside-toplevel
  from scoresde import run_lib  # pylint: disable=import-outside-toplevel
  from scoresde.evaluation import qa  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  clean = (0.5 + 0.1 * rng.standard_normal((40, 8, 8, 2))).astype(np.float32)
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  np.save(data_dir / 'a.npy', clean[:30])
  np.savez(data_dir / 'b.npz', rest=clean[30:])
  config = _tiny_qa_config(data_dir)
  assert datasets.num_examples(config, 'test') == 10 and datasets.num_examples(config, 'train') == 30
  workdir = str(tmp_path / 'run')
  run_lib.train(config, workdir)
  calibration = anomaly.load_calibration(os.path.join(workdir, qa.CALIBRATION_FILE))
  assert calibration.num_examples == 10 and calibration.num_draws == 2 and calibration.sigma == 0.05
  assert calibration.checkpoint_step == 2 and calibration.config_hash == qa.detector_hash(config)

  inputs = np.concatenate([clean[30:33], clean[30:33] + 3., clean[30:33]])
  inputs[6, 1, 2, 1] = np.nan
  input_dir = tmp_path / 'inputs'
  input_dir.mkdir()
  np.save(input_dir / 'batch.npy', inputs[:5])
  np.savez(input_dir / 'more.npz', x=inputs[5:], single=inputs[0])
  report = run_lib.qa_check(config, workdir, str(input_dir))
  summary, rows = report['summary'], report['inputs']
  assert summary['n'] == 10 == len(rows) and summary['resumed_batches'] == 0
  assert [r['id'] for r in rows[:6]] == ['batch.npy[0]', 'batch.npy[1]', 'batch.npy[2]', 'batch.npy[3]',
                                         'batch.npy[4]', 'more.npz:x[0]']
  assert rows[6]['decision'] == 'reject' and rows[6]['reason'] == 'non_finite' and rows[6]['score'] is None
  assert rows[6]['per_channel'][0] is not None and rows[6]['per_channel'][1] is None
  for r in rows:
    if r['score'] is not None:
      assert (r['decision'] == 'reject') == (r['score'] > r['threshold'])
      assert abs(sum(r['per_channel']) - r['score']) <= 1e-4 * r['score']
      assert set(r['scores_by_sigma']) == {'0.01', '0.05', '0.1', '0.2'}
    assert (r['decision'] == 'reject') == ('heatmap' in r)
    if 'heatmap' in r:
      assert os.path.exists(os.path.join(workdir, 'qa', 'inputs', r['heatmap']))
  assert summary['rejected'] == sum(r['decision'] == 'reject' for r in rows)
  assert summary['by_reason']['non_finite'] == 1
  with open(os.path.join(workdir, 'qa', 'inputs', 'report.json')) as f:
    assert json.load(f)['summary']['n'] == 10

  again = run_lib.qa_check(config, workdir, str(input_dir))  # resumes every batch from its saved file
  assert again['summary']['resumed_batches'] == 2 and again['inputs'] == rows

  # Deciding on the two-sided profile score: same residuals, its own threshold and decisions.
  by_profile = _tiny_qa_config(data_dir)
  by_profile.unlock()
  by_profile.qa.score = 'profile'
  np.save(tmp_path / 'few.npy', inputs[:5])
  profiled = run_lib.qa_check(by_profile, workdir, str(tmp_path / 'few.npy'))
  assert profiled['summary']['threshold'] == calibration.profile_threshold
  assert profiled['summary']['score'] == 'profile'
  for r, first in zip(profiled['inputs'], rows[:5]):
    assert r['scores_by_sigma'] == first['scores_by_sigma'] and r['profile_score'] == first['profile_score']
    assert (r['decision'] == 'reject') == (r['profile_score'] > calibration.profile_threshold)
  by_profile.qa.score = 'likelihood'
  with pytest.raises(ValueError, match=r"qa.score='likelihood' must be one of \('sigma', 'fused', 'profile'\)"):
    run_lib.qa_check(by_profile, workdir, str(input_dir))

  changed = _tiny_qa_config(data_dir)
  changed.unlock()
  changed.qa.num_draws = 4
  with pytest.raises(ValueError, match='qa_calibrate'):
    run_lib.qa_check(changed, workdir, str(input_dir))
  changed.qa.sigma = 0.3
  with pytest.raises(ValueError, match='not among'):
    run_lib.qa_check(changed, workdir, str(input_dir))
  bad = input_dir / 'wrong.npy'
  np.save(bad, np.zeros((2, 4, 4, 2), np.float32))
  with pytest.raises(ValueError, match=r'shape \(4, 4, 2\)'):
    run_lib.qa_check(config, workdir, str(bad))


def test_detector_loss_at_discrete_levels_has_the_residual_floor():
  """losses.sde_loss with ``times`` at the QA levels and λ = 1 is the mean residual per dimension: with the
  exact score its expectation is mean over σ of v / (σ² (v + σ²))."""
  from scoresde import losses  # pylint: disable=import-outside-toplevel
  sde = sde_lib.VESDE(0.01, 0.2, 4)
  sigmas = np.array([0.01, 0.05, 0.1, 0.2])
  data = gaussian_mixture.isotropic_mixture([1.], np.zeros((1, 8)), [0.1])
  score_fn = gaussian_mixture.isotropic_score_fn(sde, data)
  x = data.sample(jax.random.key(0), 20000).reshape(-1, 2, 2, 2)
  loss = np.asarray(jax.jit(lambda rng: losses.sde_loss(rng, score_fn, sde, x, times=sde.noise_level_time(sigmas),
                                                        unit_weighting=True))(jax.random.key(1)))
  expected = np.mean(0.01 / (sigmas**2 * (0.01 + sigmas**2)))
  assert abs(loss.mean() - expected) < 4 * loss.std() / math.sqrt(loss.size), (loss.mean(), expected)
  from configs.qa import digits  # pylint: disable=import-outside-toplevel
  config = digits.get_config()
  losses.check_dsm_levels(config)
  config.training.likelihood_weighting = True
  with pytest.raises(ValueError, match='dsm_sigmas'):
    losses.check_dsm_levels(config)
  config.training.likelihood_weighting = False
  config.training.dsm_sigmas = (0.01, 0.5)
  with pytest.raises(ValueError, match=r'\[0.5\]'):
    losses.check_dsm_levels(config)
