"""``import datasets``, as in score_sde: an alias of ``scoresde.datasets`` (the code is in scoresde/datasets.py)."""
import sys

from scoresde import datasets

sys.modules[__name__] = datasets
