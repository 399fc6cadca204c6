"""Datasets and deterministic, rank-aware samplers."""
from ..config import Config
from .digits import DigitsDataset, load_digits_images
from .latents import LatentShardDataset, build_latent_dataset
from .sampler import ShuffledBatchSampler

__all__ = ["DigitsDataset", "LatentShardDataset", "ShuffledBatchSampler", "build_dataset", "load_digits_images"]


def build_dataset(config: Config):
    if config.data.dataset == "digits":
        return DigitsDataset(hflip=config.data.hflip)
    return build_latent_dataset(config)
