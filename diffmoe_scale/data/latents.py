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


INDEX_KEYS = ("num_images", "latent_shape", "flip", "classes", "shards")
REDO = "delete it and run launch/extract_latents.py again (it redoes what is missing)"


def read_index(path: Path) -> dict:
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.path: {path} holds no readable {INDEX} ({err}); write one with "
                          f"launch/extract_latents.py") from None
    problem = index_problem(index)
    if problem:
        raise ConfigError(f"data.path: {path / INDEX}: {problem}; not an index as launch/extract_latents.py writes it")
    return index


def index_problem(index) -> str | None:
    if not isinstance(index, dict):
        return "not a JSON object"
    missing = [key for key in INDEX_KEYS if key not in index]
    if missing:
        return f"no {', '.join(missing)}"
    if not isinstance(index["shards"], list) or not all(
            isinstance(entry, dict) and {"file", "count"} <= entry.keys() for entry in index["shards"]):
        return "shards must be a list of {file, count}"
    return None


def read_array(file: Path, what: str, mmap_mode: str | None = None) -> np.ndarray:
    try:
        return np.load(file, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        problem = "truncated (shorter than its header says)" if "mmap length" in str(err) else f"unreadable ({err})"
        raise ConfigError(f"data.path: {file}: {what} {problem}; {REDO}") from None


def open_shard(path: Path, entry: dict, index: dict) -> np.ndarray:
    """A shard memory-mapped and checked against its entry in the index: a truncated or short shard fails here,
    naming the file, rather than at the step that first reads past its end."""
    file = path / entry["file"]
    shard = read_array(file, "latent shard", mmap_mode="r")
    expected = (entry["count"], 2 if index["flip"] else 1, *index["latent_shape"])
    if shard.shape != expected:
        raise ConfigError(f"data.path: {file}: latents of shape {list(shard.shape)}, but {INDEX} says "
                          f"{list(expected)} ([images, views, C, H, W]); {REDO}")
    return shard


class LatentShardDataset:
    def __init__(self, path: Path, hflip: bool):
        index = read_index(path)
        self.index = index
        labels = read_array(path / LABELS, "labels file")
        counted = sum(shard["count"] for shard in index["shards"])
        if labels.shape != (index["num_images"],) or counted != index["num_images"]:
            raise ConfigError(f"data.path: {path / LABELS}: {labels.shape[0] if labels.ndim else 0} labels and "
                              f"{counted} images in the shards, but {INDEX} says {index['num_images']} images; {REDO}")
        self.labels = torch.from_numpy(labels)
        self.shards = [open_shard(path, shard, index) for shard in index["shards"]]
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
