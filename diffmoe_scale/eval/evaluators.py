"""Scores for generated images (uint8 [N, H, W, C] as in ADM's .npz files): digit metrics for the
embedded digits, FID and Inception Score from an Inception network file for ImageNet."""
import numpy as np
import torch

from ..data import load_digits_images
from .digits_classifier import cached_digit_classifier, class_accuracy, digit_fid
from .fid import feature_statistics, frechet_distance, inception_score, load_statistics


def images_problem(images: np.ndarray, channels: int, size: int | None) -> str | None:
    """What makes `images` unfit for an evaluator of uint8 [N, size, size, channels] images (any size when
    None), or None."""
    height_width = f"{size}, {size}" if size else "H, W"
    kind = "grayscale" if channels == 1 else "RGB"
    if images.ndim != 4 or images.shape[3] != channels or (size and images.shape[1:3] != (size, size)):
        return f"arr_0 has shape {list(images.shape)}; this evaluator needs {kind} images [N, {height_width}, {channels}]"
    if images.dtype != np.uint8:
        return f"arr_0 holds {images.dtype}; this evaluator needs uint8 pixels (0..255)"
    if len(images) < 2:
        return f"{len(images)} image(s); the Fréchet distance needs at least 2"
    return None


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


class DigitsEvaluator:
    """Digit FID against all 1,797 real digits, and how often the classifier sees the asked-for digit."""

    CHANNELS, SIZE = 1, 8

    def __init__(self, seed: int = 0):
        self.model, self.classifier_accuracy = cached_digit_classifier(seed)
        self.reference = load_digits_images()[0]

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        samples = to_model_range(images)
        return {"digit_fid": digit_fid(self.model, samples, self.reference),
                "digit_accuracy": class_accuracy(self.model, samples, torch.from_numpy(labels)),
                "classifier_held_out_accuracy": self.classifier_accuracy}


class InceptionEvaluator:
    """FID against reference statistics and the Inception Score, from an Inception network saved as
    TorchScript with the interface of the `inception-2015-12-05.pt` file that StyleGAN3's and ADM-style
    evaluators use: net(uint8 [N, 3, H, W], return_features=True) -> pool features [N, 2048];
    return_features=False -> class probabilities. The network runs on the GPU when there is one (`device`:
    None chooses), taking uint8 batches there (a quarter of the bytes of float) and returning float64 on
    the host."""

    CHANNELS, SIZE = 3, None  # the network resizes

    def __init__(self, network_path, reference_path=None, batch_size: int = 200, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.network = torch.jit.load(str(network_path), map_location=self.device).eval()
        self.reference = load_statistics(reference_path) if reference_path else None
        self.batch_size = batch_size

    @torch.no_grad()
    def outputs(self, images: np.ndarray, return_features: bool) -> np.ndarray:
        batches = torch.from_numpy(images).permute(0, 3, 1, 2).split(self.batch_size)
        return torch.cat([self.network(batch.to(self.device), return_features=return_features).double().cpu()
                          for batch in batches]).numpy()

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.outputs(images, return_features=True)

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"fid": frechet_distance(*feature_statistics(self.features(images)), *self.reference),
                "inception_score": inception_score(self.outputs(images, return_features=False))}
