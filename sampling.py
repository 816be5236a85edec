"""``import sampling``, as in score_sde: an alias of ``scoresde.sampling`` (the code is in scoresde/sampling.py)."""
import sys

from scoresde import sampling

sys.modules[__name__] = sampling
