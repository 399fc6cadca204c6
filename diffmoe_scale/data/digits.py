"""scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes) as 1-channel latents."""
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch


def digits_file() -> Path:
    """The CSV that scikit-learn ships the digits in (64 pixel values and the label per line). Found without
    importing scikit-learn, which takes about 3 s (SciPy with it) at every start of a process; that its
    `load_digits` reads the same data is pinned by tests/test_digits.py."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits dataset comes with scikit-learn: pip install scikit-learn")
    return Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Images scaled from 0..16 to [-1, 1], shape [1797, 1, 8, 8], and labels [1797]."""
    with gzip.open(digits_file(), "rt") as rows:
        table = np.loadtxt(rows, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :64]).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    return images, torch.from_numpy(table[:, 64]).long()


class DigitsDataset:
    def __init__(self, hflip: bool = False):
        self.images, self.labels = load_digits_images()
        self.hflip = hflip

    def __len__(self):
        return len(self.labels)

    def batch(self, indices: torch.Tensor, flip: torch.Tensor | None = None):
        """Images and labels at `indices`; images where `flip` is true are mirrored left-right."""
        images = self.images[indices]
        if self.hflip and flip is not None:
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        return images, self.labels[indices]
