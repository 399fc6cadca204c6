"""The few collectives the trainer and the parallel layers share (no-ops in a world of one)."""
import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all ranks of `group`), in rank order."""
    if group is None and not _distributed():
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def average_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over every rank (a new tensor)."""
    tensor = tensor.clone()
    if _distributed():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on some rank."""
    if not _distributed():
        return flag
    value = torch.tensor(float(flag))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
