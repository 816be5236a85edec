"""scoresde: score-based generative modelling through SDEs, in JAX/Flax.

The package in the order data flows (the README's "Code map" says the same, one line each):

- ``datasets``: data pipelines (embedded digits, TFDS, toy mixtures) and the data scaler;
- ``sde_lib``: the VE, VP and sub-VP SDEs and every schedule table, index and network label;
- ``models``: the score networks and ``models.utils``, the one place a network becomes ``score_fn(x, t)``;
- ``losses``: denoising / sliced score matching, the train step, EMA;
- ``sampling`` and ``ode_solvers``: predictor-corrector and probability-flow ODE samplers;
- ``likelihood``: exact bits/dim by the instantaneous change of variables;
- ``evaluation``: FID/IS/KID, their feature networks and the resumable sample-quality and bits/dim loops;
- ``porting``: reading released checkpoints of the reference implementations (no code runs from them);
- ``infra``: device mesh, atomic/resumable outputs, image grids;
- ``checkpointing``, ``generate`` and ``run_lib``: checkpoints, sample export and the train/eval loops;
- ``gaussian_mixture``: exact marginal scores and densities of Gaussian mixtures, the truth tests use.

The layering is checked by import-linter (``.importlinter``). ``main.py`` is the command line; the root
modules ``sde_lib``, ``losses``, ``sampling``, ``likelihood``, ``datasets``, ``run_lib``, ``models`` and
``evaluation`` are aliases of these, so score_sde users' ``import sde_lib`` keeps working.
"""

import os as _os

# Committed data files (feature-network weights, dataset statistics) live beside the package.
ASSETS_DIR = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), 'assets')
