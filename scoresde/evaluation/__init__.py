"""Evaluation: sample-quality metrics and their feature networks, and the loops that compute them.

- ``metrics``: FID, IS, KID and the feature extractors (the public names are re-exported here);
- ``inception``, ``digits_classifier``: the feature networks;
- ``rounds``: resumable, sharded evaluation rounds, shared by the two loops below;
- ``sample_quality``: sample → features → FID/IS/KID for a checkpoint;
- ``bits_per_dim``: exact test-set bits/dim for a checkpoint.
"""

from scoresde.evaluation.metrics import FeatureExtractor
from scoresde.evaluation.metrics import frechet_distance
from scoresde.evaluation.metrics import inception_score
from scoresde.evaluation.metrics import kernel_inception_distance

__all__ = ['FeatureExtractor', 'frechet_distance', 'inception_score', 'kernel_inception_distance']
