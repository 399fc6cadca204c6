"""Fréchet distance against a direct scipy computation, and the digit classifier's FID and accuracy."""
import numpy as np
import pytest
import scipy.linalg
import torch

from diffmoe_scale.eval import digits_classifier
from diffmoe_scale.eval.digits_classifier import cached_digit_classifier, class_accuracy, digit_fid, split_digits
from diffmoe_scale.eval.fid import feature_statistics, frechet_distance


def frechet_by_scipy(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook formula with a general matrix square root of the product."""
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * root.real))


@pytest.mark.parametrize("dim", [4, 64])
def test_frechet_distance_equals_the_scipy_computation(dim):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(500, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(loc=0.3, size=(400, dim)) @ rng.normal(size=(dim, dim))
    ours = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert ours == pytest.approx(frechet_by_scipy(*feature_statistics(a), *feature_statistics(b)), rel=1e-6)


def test_frechet_distance_of_a_shift_is_its_squared_length():
    features = np.random.default_rng(0).normal(size=(300, 8))
    mu, sigma = feature_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    assert frechet_distance(mu, sigma, mu + 0.5, sigma) == pytest.approx(8 * 0.25, rel=1e-9)


def test_statistics_need_two_vectors():
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))


@pytest.fixture(scope="module")
def classifier():
    return cached_digit_classifier(seed=0)  # as the evaluators have it: trained here or read from the cache


def test_digit_classifier_recognises_held_out_digits(classifier):
    model, held_out_accuracy = classifier
    _, _, images, labels = split_digits(seed=0)
    assert held_out_accuracy == class_accuracy(model, images, labels) > 0.95


def test_digit_fid_is_near_zero_for_real_digits_and_large_for_noise(classifier):
    model, _ = classifier
    train_images, _, held_out, _ = split_digits(seed=0)
    noise = torch.rand(held_out.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    real, noisy = digit_fid(model, train_images, held_out), digit_fid(model, noise, held_out)
    assert real < 0.02 * noisy
    assert noisy > 100


def test_the_classifier_is_trained_once_then_read_and_trained_again_when_its_file_is_torn(tmp_path, monkeypatch):
    model, accuracy = cached_digit_classifier(epochs=1, cache=tmp_path)
    (kept,) = tmp_path.glob("digit_classifier_*.pt")
    train = digits_classifier.train_digit_classifier
    monkeypatch.setattr(digits_classifier, "train_digit_classifier", lambda *args: pytest.fail("trained again"))
    read, read_accuracy = cached_digit_classifier(epochs=1, cache=tmp_path)
    assert read_accuracy == accuracy
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), read.state_dict().values()))
    kept.write_bytes(kept.read_bytes()[:1000])
    monkeypatch.setattr(digits_classifier, "train_digit_classifier", train)
    assert cached_digit_classifier(epochs=1, cache=tmp_path)[1] == accuracy  # deterministic for a seed
    assert cached_digit_classifier(epochs=2, cache=tmp_path)  # another recipe, another file
    assert len(list(tmp_path.glob("digit_classifier_*.pt"))) == 2 and kept.stat().st_size > 1000
