"""scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes) as 1-channel latents."""
import torch


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Images scaled from 0..16 to [-1, 1], shape [1797, 1, 8, 8], and labels [1797]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.tensor(digits.target, dtype=torch.long)


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
