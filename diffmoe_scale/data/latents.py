"""VAE latents of an image dataset as launch/extract_latents.py writes them, read memory-mapped.

<dir>/index.json          what was encoded and how: num_images, latent_shape [C, H, W], flip, vae,
                          scale_factor, image_size, classes, shards [{file, count}]; written last
<dir>/labels.npy          int64 [num_images], class index of each image in dataset order
<dir>/shard_<k>.npy       float16 [count, V, C, H, W]: V = 2 when the mirrored image was encoded
                          too (second), else 1
"""
import json
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError

INDEX = "index.json"
LABELS = "labels.npy"


def shard_name(shard: int) -> str:
    return f"shard_{shard:05d}.npy"


def read_index(path: Path) -> dict:
    try:
        return json.loads((path / INDEX).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.path: {path} holds no readable {INDEX} ({err}); write one with "
                          f"launch/extract_latents.py") from None


class LatentShardDataset:
    def __init__(self, path: Path, hflip: bool):
        index = read_index(path)
        self.index = index
        self.labels = torch.from_numpy(np.load(path / LABELS))
        self.shards = [np.load(path / shard["file"], mmap_mode="r") for shard in index["shards"]]
        self.starts = np.cumsum([0] + [shard["count"] for shard in index["shards"]])
        self.hflip = hflip

    def __len__(self):
        return len(self.labels)

    def batch(self, indices: torch.Tensor, flip: torch.Tensor | None = None):
        """Latents and labels at `indices`; where `flip` is true (and hflip is on), the mirrored image's."""
        positions = indices.numpy()
        shards = np.searchsorted(self.starts, positions, side="right") - 1
        variants = flip.numpy().astype(int) if self.hflip and flip is not None else np.zeros(len(positions), int)
        rows = [self.shards[s][p - self.starts[s], v] for s, p, v in zip(shards, positions, variants)]
        return torch.from_numpy(np.stack(rows).astype(np.float32)), self.labels[indices]


def build_latent_dataset(config: Config) -> LatentShardDataset:
    """The dataset at data.path, checked against the model it is to train."""
    path, model = Path(config.data.path), config.model
    dataset = LatentShardDataset(path, config.data.hflip)
    index = dataset.index
    if tuple(index["latent_shape"]) != (model.in_channels, model.input_size, model.input_size):
        raise ConfigError(f"model.input_size / model.in_channels: the latents in {path} are {index['latent_shape']} "
                          f"(C, H, W); the model expects [{model.in_channels}, {model.input_size}, {model.input_size}]")
    if len(index["classes"]) != model.num_classes:
        raise ConfigError(f"model.num_classes: {model.num_classes}, but {path} has {len(index['classes'])} classes")
    if config.data.hflip and not index["flip"]:
        raise ConfigError(f"data.hflip: {path} was extracted without the mirrored images (--no-flip); "
                          f"set data.hflip=false or extract again")
    return dataset
