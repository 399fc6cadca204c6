"""Datasets and deterministic, rank-aware samplers."""
from ..config import Config, ConfigError
from .digits import DigitsDataset, load_digits_images
from .sampler import ShuffledBatchSampler

__all__ = ["DigitsDataset", "ShuffledBatchSampler", "build_dataset", "load_digits_images"]


def build_dataset(config: Config):
    if config.data.dataset == "digits":
        return DigitsDataset(hflip=config.data.hflip)
    raise ConfigError(
        f"data.dataset={config.data.dataset!r}: this version trains on the embedded digits only; "
        "the ImageNet latent-shard reader (launch/extract_latents.py) is not in this release yet"
    )
