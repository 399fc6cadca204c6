"""Whole-model tensors from the shards a rank holds (expert shards over EP, TP shards over TP)."""
import torch
from deepspeed.moe.utils import is_moe_param

from .collectives import all_gather
from .groups import ParallelGroups


def full_tensor(param: torch.nn.Parameter, tensor: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """The whole-model version of `tensor` (the parameter itself, its gradient or an EMA copy),
    laid out as `param` is sharded. Collective: every rank of the groups involved must call it."""
    if is_moe_param(param) and groups.ep_size > 1:
        tensor = torch.cat(all_gather(tensor, groups.ep_group))  # experts in EP rank order
    if hasattr(param, "tp_index") and groups.tp_size > 1:
        tp_group = groups.mpu.get_tensor_model_parallel_group()
        dim = param.partition_dim
        index = torch.cat(all_gather(param.tp_index, tp_group))
        shards = torch.cat(all_gather(tensor, tp_group), dim=dim)
        tensor = torch.empty_like(shards).index_copy_(dim, index, shards)
    return tensor


def full_state(model, groups: ParallelGroups, tensor_of=lambda param: param) -> dict[str, torch.Tensor]:
    """name -> whole tensor of `tensor_of(param)` for every parameter (skipping those it maps to None)."""
    return {name: full_tensor(param, tensor_of(param).detach(), groups)
            for name, param in model.named_parameters() if tensor_of(param) is not None}
