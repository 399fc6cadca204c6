"""The few collectives the trainer and the parallel layers share (no-ops in a world of one).

Every tensor handed to a collective lives on the device the process computes on: NCCL, the backend on
GPUs, has no CPU tensors. Object collectives are torch's, which place their buffers by backend."""
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


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value`, on every rank (`device`: where this process computes)."""
    if not _distributed():
        return value
    tensor = torch.tensor(value, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order."""
    if not _distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Rank 0's picklable `obj`, on every rank."""
    if not _distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if _distributed():
        dist.barrier()
