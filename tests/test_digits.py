"""The digits are read from scikit-learn's data file without importing scikit-learn: the same images and
labels as its own loader gives."""
import torch
from sklearn.datasets import load_digits

from diffmoe_scale.data import load_digits_images


def test_the_digits_are_what_scikit_learn_loads():
    images, labels = load_digits_images()
    digits = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert torch.equal(images, torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0)
    assert torch.equal(labels, torch.tensor(digits.target, dtype=torch.long))
