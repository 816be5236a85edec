"""What a released checkpoint holds once mapped onto our parameter trees, whichever reference wrote it."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

Params = Any  # a nested dict in our Flax layout, float32 numpy leaves


class Released(NamedTuple):
  """A released checkpoint's training state in our layout (``checkpointing.import_checkpoint`` writes it
  into a run directory).

  ``adam``: the first and second moments (optax's ``mu``, ``nu``) in our layout, and the number of Adam
  updates they have seen (optax's ``count``): flax.optim.Adam's ``grad_ema``/``grad_sq_ema``/``step``, or
  torch Adam's ``exp_avg``/``exp_avg_sq``/``step``; None when the file has no optimizer state.
  ``rng``: the file's PRNG key (uint32[2]) where it stores one.
  """
  params: Params
  params_ema: Params
  step: int
  adam: tuple[Params, Params, int] | None
  rng: np.ndarray | None
  format: str
