"""A small CNN trained on the real digits: its penultimate activations are the features of the
"digit FID", and its predictions score whether class-conditional samples show the asked-for digit.
Training it takes 10-15 s of CPU; each machine trains it once and keeps it in its cache directory."""
import hashlib
import os
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from ..data import load_digits_images
from ..data.digits import digits_file
from ..train.checkpoint import atomic_torch_save
from .fid import feature_statistics, frechet_distance

FEATURES = 64


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, FEATURES] for [N, 1, 8, 8] images in [-1, 1]."""
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def split_digits(seed: int = 0, held_out: float = 0.2):
    """(train images, train labels, held-out images, held-out labels): a fixed random split."""
    images, labels = load_digits_images()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(len(labels) * (1 - held_out))
    return images[order[:cut]], labels[order[:cut]], images[order[cut:]], labels[order[cut:]]


def train_digit_classifier(seed: int = 0, epochs: int = 30) -> tuple[DigitClassifier, float]:
    """The classifier trained on the training split (deterministic for a seed), and its accuracy on the
    held-out split."""
    train_x, train_y, held_x, held_y = split_digits(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(train_y), generator=generator).split(64):
            loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model, class_accuracy(model, held_x, held_y)


def cache_directory() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffmoe_scale"


def cached_digit_classifier(seed: int = 0, epochs: int = 30,
                            cache: Path | None = None) -> tuple[DigitClassifier, float]:
    """`train_digit_classifier(seed, epochs)`, trained once and then read from a file in `cache` (default:
    `cache_directory()`) named by a digest of all the training reads: this file's code, the digits, torch's
    version, the seed and the epochs. Processes that want it at once train it once (a file lock); a cache file
    that does not read back is trained again, and where nothing can be written it is trained every time."""
    recipe = Path(__file__).read_bytes() + digits_file().read_bytes() + f"{torch.__version__} {seed} {epochs}".encode()
    path = (cache or cache_directory()) / f"digit_classifier_{hashlib.sha256(recipe).hexdigest()[:16]}.pt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{path}.lock")
        lock.acquire()
    except OSError:  # nowhere to keep it
        return train_digit_classifier(seed, epochs)
    try:
        found = _read_classifier(path)
        if found is None:
            found = train_digit_classifier(seed, epochs)
            _keep_classifier(path, *found)
        return found
    finally:
        lock.release()


def _read_classifier(path: Path) -> tuple[DigitClassifier, float] | None:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitClassifier()
        model.load_state_dict(saved["weights"])
        return model.eval(), saved["held_out_accuracy"]
    except Exception:  # missing, or not a whole file as _keep_classifier writes it
        return None


def _keep_classifier(path: Path, model: DigitClassifier, held_out_accuracy: float) -> None:
    try:
        atomic_torch_save({"weights": model.state_dict(), "held_out_accuracy": held_out_accuracy}, path)
    except OSError:
        pass  # a cache that cannot be written: it is trained again next time


@torch.no_grad()
def class_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(dim=1) == labels).float().mean().item()


@torch.no_grad()
def digit_fid(model: DigitClassifier, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between the classifier features of `images` and of `reference` images."""
    return frechet_distance(*feature_statistics(model.features(images).numpy()),
                            *feature_statistics(model.features(reference).numpy()))

