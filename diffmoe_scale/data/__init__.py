"""Datasets and deterministic, rank-aware samplers."""
from .digits import DigitsDataset, load_digits_images
from .sampler import ShuffledBatchSampler

__all__ = ["DigitsDataset", "ShuffledBatchSampler", "load_digits_images"]
