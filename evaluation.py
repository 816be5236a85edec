"""``import evaluation``: an alias of the ``scoresde.evaluation`` package (FID, IS, KID; its loops)."""
import sys

from scoresde import evaluation

sys.modules[__name__] = evaluation
