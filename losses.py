"""``import losses``, as in score_sde: an alias of ``scoresde.losses`` (the code is in scoresde/losses.py)."""
import sys

from scoresde import losses

sys.modules[__name__] = losses
