"""The toy lab against truth: the exact score has a zero error field, a score off by a constant c has the
weighted error ‖c‖, plain Langevin misses the mode weights of Song & Ermon's mixture while annealed
Langevin recovers them, each score-matching objective learns (a short training), the deterministic samplers'
paths end where the ODE's do, and every PNG is written.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from scoresde import gaussian_mixture
from scoresde import sde_lib
from scoresde import visualize

SDE = sde_lib.VPSDE(0.1, 20., 1000)
DATA = gaussian_mixture.default_mixture(2)
EXACT = gaussian_mixture.isotropic_score_fn(SDE, DATA)


def test_weighted_error_is_zero_for_exact_and_the_offset_for_a_shifted_score():
  shift = jnp.array([0.3, -0.4])
  for t in (0.01, 0.5):
    assert visualize.weighted_error(jax.random.PRNGKey(0), EXACT, EXACT, SDE, DATA, t, n=512) == 0.
    shifted = visualize.weighted_error(jax.random.PRNGKey(0), lambda x, t: EXACT(x, t) + shift, EXACT,
                                       SDE, DATA, t, n=512)
    np.testing.assert_allclose(shifted, 0.5, rtol=1e-5)


def test_lab_writes_pngs_and_the_langevin_finding_holds(tmp_path):
  summary = visualize.write_figures(jax.random.PRNGKey(1), EXACT, SDE, DATA, str(tmp_path), sm_steps=300)
  assert set(summary['weighted_error'].values()) == {0.}  # the error field of the exact score is zero
  langevin = summary['langevin']
  assert langevin['plain_weight_error'] > 0.2  # chains stay in the basin they start in: about 1/2, 1/2
  assert langevin['annealed_weight_error'] < 0.05
  assert langevin['annealed_weight_error'] < langevin['plain_weight_error'] / 5
  divergences = summary['fisher_divergence']  # each objective learns: far below the untrained network's
  for name in ('dsm', 'ssm', 'ssm_vr', 'exact_sm'):
    assert divergences[name] < divergences['untrained'] / 5, divergences
  paths = summary['trajectories']  # the deterministic solvers discretise the ODE's map; noise does not
  assert paths['ode']['end_distance_to_ode'] == 0.
  for name in ('heun', 'dpm_solver++'):  # measured 0.026, 0.086 at 18 time points
    assert paths[name]['end_distance_to_ode'] < 0.15, paths
  for name in ('pc', 'edm_sde'):  # measured 5.9, 5.2: samples land in other modes
    assert paths[name]['end_distance_to_ode'] > 1., paths
  assert (paths['pc']['nfe'], paths['heun']['nfe'], paths['dpm_solver++']['nfe']) == (2000, 35, 18)
  for name in ('score_field.png', 'error_field.png', 'langevin.png', 'score_matching.png', 'trajectories.png'):
    with Image.open(os.path.join(tmp_path, name)) as image:
      assert image.size[0] > visualize.PANEL and image.size[1] > visualize.PANEL
  with open(os.path.join(tmp_path, 'summary.json')) as f:
    assert json.load(f) == summary


def test_visualize_refuses_data_without_exact_truth():
  config = ml_collections.ConfigDict({'data': {'dataset': 'moons', 'dim': 2}})
  with pytest.raises(ValueError, match="config.data.dataset='gmm'"):
    visualize.visualize(config, '/nonexistent')
