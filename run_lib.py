"""``import run_lib``, as in score_sde: an alias of ``scoresde.run_lib`` (the code is in scoresde/run_lib.py)."""
import sys

from scoresde import run_lib

sys.modules[__name__] = run_lib
