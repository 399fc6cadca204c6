"""A rank's rows of a global training batch with their random draws (the trainer's, and calibration's)."""
import torch

from ..config import Config
from ..data import ShuffledBatchSampler


def rank_batch(config: Config, dataset, objective, sampler: ShuffledBatchSampler, dp_rank: int, device,
               seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's rows of `sampler`'s next global batch: images, labels and their random draws, in fp32.

    Noise, timesteps and label-dropout bits are drawn for the whole global batch on every rank
    and each rank keeps its rows, so a sample's numbers do not depend on the parallel layout. They
    come from a generator seeded by (seed, sampler step) on `device`: no generator state to save, and a
    checkpoint resumes the same draws on another machine of the same device type."""
    generator = torch.Generator(device=device).manual_seed(seed * 2**32 + sampler.step)
    indices, flips = sampler.next_indices()
    images, labels = dataset.batch(indices, flips)
    size = config.model.input_size
    shape = (config.train.global_batch_size, config.model.in_channels, size, size)
    noise, t = objective.draw(shape, generator, device=device)
    drop = torch.rand(shape[0], generator=generator, device=device) < config.model.class_dropout
    own = slice(dp_rank * len(indices), (dp_rank + 1) * len(indices))
    draws = {"noise": noise[own], "t": t[own], "drop": drop[own]}
    if torch.device(device).type == "cuda":  # a blocking copy from pageable memory would wait for the last step
        images, labels = images.pin_memory(), labels.pin_memory()
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True), draws


def dropped_labels(labels: torch.Tensor, drop: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The labels the model sees: the null class (`num_classes`) where the label is dropped."""
    return torch.where(drop, torch.full_like(labels, num_classes), labels)
