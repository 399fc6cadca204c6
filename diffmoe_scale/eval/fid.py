"""Fréchet distance between Gaussians fitted to two sets of features (FID when the features are
Inception's pool features)."""
import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of [N, D] features."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) is taken as the sum of square roots of the eigenvalues of the symmetric
    sqrt(S1) S2 sqrt(S1), which has the same spectrum as S1 S2: no complex round-off to discard, as
    with a general matrix square root of the (non-symmetric) product."""
    root = _psd_sqrt(sigma1)
    product_eigenvalues = np.linalg.eigvalsh(root @ sigma2 @ root)
    trace_sqrt_product = np.sqrt(np.clip(product_eigenvalues, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product)

