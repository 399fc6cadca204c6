"""A small CNN trained on the real digits: its penultimate activations are the features of the
"digit FID", and its predictions score whether class-conditional samples show the asked-for digit."""
import torch
from torch import nn

from ..data import load_digits_images
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


@torch.no_grad()
def class_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(dim=1) == labels).float().mean().item()


@torch.no_grad()
def digit_fid(model: DigitClassifier, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between the classifier features of `images` and of `reference` images."""
    return frechet_distance(*feature_statistics(model.features(images).numpy()),
                            *feature_statistics(model.features(reference).numpy()))

