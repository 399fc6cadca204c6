"""Capacity by condition: how many experts the tokens of a sample take, averaged over the MoE layers,
by noise level and by class over a logging window (DiffMoE's dynamic capacity: noisier inputs and
harder classes may take more)."""
import torch

from ..parallel.collectives import average_over_ranks

NOISE_BINS = 10  # noise levels [0, 0.1), ..., [0.9, 1]: 0 is data, 1 pure noise


class CapacityByCondition:
    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        # On the model's device: adding a step's counts must not wait for the device.
        self.sums = torch.zeros(NOISE_BINS + num_classes, dtype=torch.float64, device=device)
        self.counts = torch.zeros_like(self.sums)

    @torch.no_grad()
    def add(self, model, noise_level: torch.Tensor, labels: torch.Tensor) -> None:
        """Record the last forward of this rank's samples (`labels`: their classes, before label dropout)."""
        layers = model.moe_layers()
        if not layers:
            return
        batch = len(labels)
        per_sample = torch.stack([
            layer.experts_per_token(layer.last_num_tokens // layer.dispatch.size).view(batch, -1).double().mean(dim=1)
            for layer in layers]).mean(dim=0)
        noise_bin = (noise_level.double() * NOISE_BINS).long().clamp(0, NOISE_BINS - 1)
        bins = torch.cat([noise_bin, NOISE_BINS + labels])
        self.sums.index_add_(0, bins, per_sample.repeat(2))
        self.counts.index_add_(0, bins, torch.ones_like(per_sample).repeat(2))

    def take(self) -> dict[str, list]:
        """The window's means over every rank (None where a bin saw no sample); starts a new window.
        Collective."""
        # Averaging sums and counts over the ranks leaves their ratio that of the totals.
        totals = average_over_ranks(torch.stack([self.sums, self.counts]))
        means = [s / c if c else None for s, c in zip(totals[0].tolist(), totals[1].tolist())]
        self.sums.zero_()
        self.counts.zero_()
        return {"capacity_by_noise": means[:NOISE_BINS], "capacity_by_class": means[NOISE_BINS:]}
