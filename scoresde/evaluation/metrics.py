"""Sample-quality metrics (FID, IS, KID) and the feature networks they are computed with.

- FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to feature sets,
  ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½).
- IS (Salimans et al. 2016): exp(E_x KL(p(y|x) ‖ p(y))), averaged over ``splits`` disjoint splits as in
  the original code; ``splits=1`` is TF-GAN's ``classifier_score_from_logits``, the score_sde reference's.
- KID (Bińkowski et al. 2018, "Demystifying MMD GANs", §4): the unbiased MMD² estimator with the cubic
  polynomial kernel k(x, y) = (xᵀy / d + 1)³, averaged over disjoint blocks, with its standard error.

Feature networks (``get_feature_extractor``): the FID Inception-v3 (``evaluation.inception``) for image
datasets, and for the embedded 8×8 digits a small classifier (``evaluation.digits_classifier``) whose
penultimate features and logits give "digits FID / IS / KID" offline.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import numpy as np

Features = tuple[np.ndarray, np.ndarray]  # (pool features (N, D), logits (N, K))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'need at least 2 feature vectors of shape (N, D); got {features.shape}.')
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
  eigvals, eigvecs = np.linalg.eigh(cov)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0., None))) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
  """Fréchet (2-Wasserstein²) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂).

  Tr (Σ₁Σ₂)^½ = Tr (Σ₁^½ Σ₂ Σ₁^½)^½, since Σ₁Σ₂ is similar to the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½;
  both square roots then come from symmetric eigendecompositions, with round-off negative
  eigenvalues clipped to 0. This needs no ε offset on singular covariances (N < D) and gives no
  imaginary parts, unlike ``scipy.linalg.sqrtm`` of the non-symmetric product.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
    raise ValueError(f'mismatched statistics: mu {mu1.shape} vs {mu2.shape}, '
                     f'cov {cov1.shape} vs {cov2.shape}.')
  sqrt1 = _psd_sqrt(cov1)
  middle = sqrt1 @ cov2 @ sqrt1
  tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.), 0., None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2. * tr_covmean)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def _inception_score_one(log_p: np.ndarray) -> float:
  # log p(y) = log mean_x p(y|x); KL(p(y|x) ‖ p(y)) = Σ_y p(y|x) (log p(y|x) − log p(y)).
  log_marginal = np.log(np.mean(np.exp(log_p), axis=0))
  kl = np.sum(np.exp(log_p) * (log_p - log_marginal), axis=1)
  return float(np.exp(np.mean(kl)))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """IS of logits (N, K): mean and standard deviation over ``splits`` consecutive equal splits.

  ``splits=1`` gives the single value over all N (TF-GAN's, as score_sde reports). Uniform
  predictions give 1; confident predictions spread evenly over K classes give K.
  """
  logits = np.asarray(logits)
  if logits.ndim != 2:
    raise ValueError(f'logits must be (N, K); got {logits.shape}.')
  if not 1 <= splits <= logits.shape[0]:
    raise ValueError(f'splits={splits} must be between 1 and the number of samples ({logits.shape[0]}).')
  log_p = _log_softmax(logits)
  scores = [_inception_score_one(part) for part in np.array_split(log_p, splits)]
  return float(np.mean(scores)), float(np.std(scores))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.) -> np.ndarray:
  """k(x, y) = (xᵀy / d + coef0)^degree for rows of x (N, d) and y (M, d)."""
  return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.) -> float:
  """Unbiased MMD² (Gretton et al. 2012, Lemma 6; unequal set sizes allowed):

  Σ_{i≠j} k(xᵢ, xⱼ) / (m(m−1)) + Σ_{i≠j} k(yᵢ, yⱼ) / (n(n−1)) − 2 Σ_{i,j} k(xᵢ, yⱼ) / (mn).
  """
  m, n = x.shape[0], y.shape[0]
  kxx, kyy = polynomial_kernel(x, x, degree, coef0), polynomial_kernel(y, y, degree, coef0)
  kxy = polynomial_kernel(x, y, degree, coef0)
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
               - 2. * kxy.mean())


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, block_size: int = 1000,
                              degree: int = 3, coef0: float = 1., seed: int = 0) -> tuple[float, float]:
  """KID: mean and standard error of unbiased MMD² over disjoint blocks.

  Both sets are shuffled (``seed``) and cut into the same number B of near-equal blocks; block b of one
  set is compared with block b of the other, as in TF-GAN's ``kernel_classifier_distance_and_std``.
  The blocks are disjoint, so the B estimates are independent and unbiased: their mean is unbiased and
  std / √B is its standard error. B = ⌈max(N₁, N₂) / block_size⌉ (50 for 50,000 samples), raised for
  small sets to up to 10 blocks of at least 50 (and never below 2) so that the standard error has a
  few degrees of freedom.
  """
  x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f'feature sets must be (N, D) with the same D; got {x.shape} and {y.shape}.')
  blocks = max(2, -(-max(len(x), len(y)) // block_size), min(10, min(len(x), len(y)) // 50))
  if min(len(x), len(y)) < 2 * blocks:
    raise ValueError(f'KID needs at least {2 * blocks} features per set; got {len(x)} and {len(y)}.')
  rng = np.random.default_rng(seed)
  xs = np.array_split(x[rng.permutation(len(x))], blocks)
  ys = np.array_split(y[rng.permutation(len(y))], blocks)
  estimates = np.array([mmd2_unbiased(a, b, degree, coef0) for a, b in zip(xs, ys)])
  return float(estimates.mean()), float(estimates.std(ddof=1) / np.sqrt(blocks))


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """A feature network: ``fn(images float32 (B, H, W, C) in [0, 1]) -> (features (B, D), logits (B, K))``,
  jitted, run by ``compute_features`` on fixed-size batches sharded over this process's devices."""
  name: str
  fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
  feature_dim: int
  num_logits: int


def get_feature_extractor(config) -> FeatureExtractor:
  """The digits classifier for ``config.data.dataset == 'digits'``, else the FID Inception-v3
  (weights from ``config.eval.inception_path``, see ``evaluation.inception.load_variables``).

  Cached per (network, weights, layout): evaluating many checkpoints loads and compiles it once.
  """
  if str(config.data.dataset).lower() == 'digits':
    from scoresde import datasets  # pylint: disable=import-outside-toplevel
    layout = datasets._digits_layout(config)  # pylint: disable=protected-access
    return _digits_extractor(int(config.data.image_size), layout)
  return _inception_extractor(str(config.eval.inception_path))


@functools.lru_cache(maxsize=4)
def _digits_extractor(image_size: int, layout: str) -> FeatureExtractor:
  from scoresde.evaluation import digits_classifier  # pylint: disable=import-outside-toplevel
  params = digits_classifier.load_params()
  apply = jax.jit(functools.partial(digits_classifier.DigitsClassifier().apply, return_features=True))
  return FeatureExtractor(
      'digits_classifier',
      lambda images: apply({'params': params}, digits_classifier.to_native(images, image_size, layout)),
      digits_classifier.FEATURE_DIM, digits_classifier.NUM_CLASSES)


@functools.lru_cache(maxsize=1)
def _inception_extractor(path: str) -> FeatureExtractor:
  from scoresde.evaluation import inception  # pylint: disable=import-outside-toplevel
  return FeatureExtractor('inception_v3_fid', inception.feature_fn(inception.load_variables(path)),
                          inception.POOL_DIM, inception.NUM_LOGITS)


def compute_features(extractor: FeatureExtractor, images: np.ndarray, batch_size: int = 256) -> Features:
  """Features (N, D) and logits (N, K) of uint8 images (N, H, W, C), in float64.

  Batches have one fixed size (a multiple of the local device count; the last one zero-padded), so
  the network compiles once, and are sharded over this process's devices.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'compute_features expects uint8 images (N, H, W, C); '
                     f'got {images.dtype} {images.shape}.')
  devices = jax.local_devices()
  batch_size = -(-min(batch_size, len(images)) // len(devices)) * len(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  feats, logits = [], []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    n = len(batch)
    batch = np.pad(batch, ((0, batch_size - n),) + ((0, 0),) * 3).astype(np.float32) / 255.
    f, l = extractor.fn(jax.device_put(batch, sharding))
    feats.append(np.asarray(f, np.float64)[:n])
    logits.append(np.asarray(l, np.float64)[:n])
  return np.concatenate(feats), np.concatenate(logits)


def quality_metrics(features: np.ndarray, logits: np.ndarray, ref_mu: np.ndarray, ref_cov: np.ndarray,
                    ref_features: np.ndarray | None = None, is_splits: int = 10) -> dict[str, float]:
  """FID against reference statistics, IS (splits and single), and KID when reference features exist."""
  mu, cov = feature_stats(features)
  is_mean, is_std = inception_score(logits, splits=min(is_splits, len(logits)))
  report = {'fid': frechet_distance(mu, cov, ref_mu, ref_cov), 'is': is_mean, 'is_std': is_std,
            'is_splits': min(is_splits, len(logits)), 'is_single_split': inception_score(logits, 1)[0]}
  if ref_features is not None:
    report['kid'], report['kid_stderr'] = kernel_inception_distance(features, ref_features)
  return report
