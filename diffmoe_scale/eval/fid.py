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



def save_statistics(path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Reference statistics as ADM's reference batches store them (arrays `mu`, `sigma`)."""
    np.savez(path, mu=mu, sigma=sigma)


def load_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path}: reference statistics need arrays 'mu' and 'sigma' (it has {sorted(data)})")
        return data["mu"], data["sigma"]


def inception_score(probabilities: np.ndarray, splits: int = 10) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over `splits` equal parts as is customary."""
    scores = []
    for part in np.array_split(np.asarray(probabilities, dtype=np.float64), splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))
