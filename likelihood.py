"""``import likelihood``, as in score_sde: an alias of ``scoresde.likelihood`` (the code is in scoresde/likelihood.py)."""
import sys

from scoresde import likelihood

sys.modules[__name__] = likelihood
