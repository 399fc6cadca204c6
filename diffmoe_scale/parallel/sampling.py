"""Class-conditional sampling with every rank taking part (experts may be sharded over them)."""
import torch

from ..config import SampleConfig
from .collectives import all_gather
from .groups import ParallelGroups


@torch.no_grad()
def sample_rows(model, objective, sample: SampleConfig, labels: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """This rank's rows of a token pool (the other ranks of its EP group call it with theirs at the same time).
    Returns (the samples, the C_avg of every MoE layer call; empty for a dense model)."""
    layer_c_avgs = []
    hooks = [layer.register_forward_hook(lambda m, *_: layer_c_avgs.append(m.capacity_per_expert().mean().item()))
             for layer in model.moe_layers()]
    try:
        images = objective.sample(model, noise, labels, steps=sample.steps, sampler=sample.sampler,
                                  cfg_scale=sample.cfg_scale)
    finally:
        for hook in hooks:
            hook.remove()
    return images, layer_c_avgs


@torch.no_grad()
def sample_distributed(model, objective, sample: SampleConfig, groups: ParallelGroups, labels: torch.Tensor,
                       noise: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """Samples for the whole batch (`labels`, `noise`: the same on every rank): each data-parallel rank
    samples its slice and the slices are gathered. Returns (images on every rank, the mean C_avg of
    the MoE layers over all sampling steps, None for a dense model)."""
    padded = -len(labels) % groups.dp_size  # repeat the last sample so the batch splits evenly
    labels = torch.cat([labels, labels[-1:].expand(padded)])
    noise = torch.cat([noise, noise[-1:].expand(padded, *noise.shape[1:])])
    share = len(labels) // groups.dp_size
    rows = slice(groups.dp_rank * share, (groups.dp_rank + 1) * share)
    images, layer_c_avgs = sample_rows(model, objective, sample, labels[rows], noise[rows])
    images = torch.cat(all_gather(images)[:: groups.tp_size])  # one copy per data-parallel rank
    c_avg = sum(layer_c_avgs) / len(layer_c_avgs) if layer_c_avgs else None
    return images[: len(images) - padded], c_avg
