"""``import sde_lib``, as in score_sde: an alias of ``scoresde.sde_lib`` (the code is in scoresde/sde_lib.py)."""
import sys

from scoresde import sde_lib

sys.modules[__name__] = sde_lib
