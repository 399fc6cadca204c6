"""Exponential moving average of the fp32 master weights, sharded as the optimizer shards them.

Each rank keeps the EMA of the part of each parameter whose fp32 master it holds: its slice of
DeepSpeed's flat partition under ZeRO 1/2 (and bf16, which needs ZeRO), or, without ZeRO, an equal
share of the parameter among the ranks that hold copies of it (the data-parallel replicas; for
experts, the expert-data-parallel group). So the EMA follows the masters, not bf16 weights; its memory
and checkpoint bytes are those of one fp32 copy of the model spread over the ranks; and a step costs one
fused lerp. `fill` writes the whole EMA into a model for sampling (collective).

Persistent buffers (DiffMoE's thresholds: running statistics already, replicated on every rank) are kept
twice: as they are in the trained model ("copy") and averaged with the weights' decay ("average", as the
DiffMoE authors' EMA does). Whole-model dicts (consolidated checkpoints, exported EMA files) hold the
average of buffer `name` under `averaged_name(name)` (see ema_thresholds.py).

DeepSpeed's partition of a parameter is read from `param._hp_mapping` (its fp32 fragment and where the
fragment sits in the flattened parameter) and `param._dp_group`, as DeepSpeed's own
`safe_get_full_fp32_param` reads them; tests/test_ema.py pins that behaviour.
"""
from typing import NamedTuple

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import groups as ds_groups

from ..parallel.consolidate import local_shard, persistent_buffers
from ..parallel.groups import ParallelGroups
from .ema_thresholds import averaged_name


class MasterSlice(NamedTuple):
    master: torch.Tensor  # fp32, 1-D: this rank's part of the parameter's master weights (a live view)
    start: int  # where that part starts in the flattened parameter
    group: object  # the process group whose ranks hold the other parts (None: the whole world)


def _replica_group(param, groups: ParallelGroups):
    """The ranks holding copies of `param` when nothing partitions it."""
    if is_moe_param(param):
        return ds_groups._get_expert_data_parallel_group(groups.expert_group_name)
    return groups.mpu.get_data_parallel_group() if groups.mpu is not None else None


def master_slice(param, groups: ParallelGroups) -> MasterSlice:
    """This rank's part of `param`'s fp32 master."""
    if hasattr(param, "_hp_mapping"):  # DeepSpeed keeps the master in an fp32 partition
        mapping = param._hp_mapping
        if mapping is None:  # none of this parameter lies in this rank's partition
            return MasterSlice(torch.empty(0, device=param.device), 0, param._dp_group)
        return MasterSlice(mapping.hp_fragment, mapping.lp_fragment_address.start, param._dp_group)
    group = _replica_group(param, groups)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    share = -(-param.numel() // size)
    start = min(rank * share, param.numel())
    return MasterSlice(param.detach().view(-1)[start:start + share], start, group)


class ShardedEMA:
    """The EMA of `model`'s master weights and of its persistent buffers (see the module docstring).
    `model` is the trained model once the DeepSpeed engine holds it."""

    def __init__(self, model, groups: ParallelGroups, decay: float):
        self.groups, self.decay = groups, decay
        self.names = [name for name, _ in model.named_parameters()]
        parts = self.parts(model)
        self.shadow = [part.master.detach().float().clone() for part in parts]
        self.layout = [(part.start, part.group) for part in parts]  # the partition is fixed for the run
        self.buffers = {name: buffer.detach().clone() for name, buffer in persistent_buffers(model).items()}
        self.buffer_averages = {name: buffer.clone() for name, buffer in self.buffers.items()}

    def parts(self, model) -> list[MasterSlice]:
        """Taken afresh at each use: DeepSpeed may relink its fragments (after loading a checkpoint)."""
        return [master_slice(param, self.groups) for param in model.parameters()]

    @torch.no_grad()
    def update(self, model) -> None:
        torch._foreach_lerp_(self.shadow, [part.master for part in self.parts(model)], 1.0 - self.decay)
        for name, buffer in persistent_buffers(model).items():
            self.buffers[name].copy_(buffer)
            self.buffer_averages[name].lerp_(buffer, 1.0 - self.decay)

    @torch.no_grad()
    def fill(self, target, buffers: str = "copy") -> None:
        """Write the EMA into `target`, a model built and parallelized like the trained one (collective
        over every rank), with its buffers copied (`buffers="copy"`) or averaged ("average"). Each
        parameter is put together from its parts with one sum over its group."""
        for param, (start, group), shadow in zip(target.parameters(), self.layout, self.shadow, strict=True):
            whole = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            whole[start:start + len(shadow)] = shadow
            if dist.is_initialized() and dist.get_world_size(group) > 1:
                dist.all_reduce(whole, group=group)
            param.copy_(whole.view_as(param))
        source = self.buffer_averages if buffers == "average" else self.buffers
        for name, buffer in persistent_buffers(target).items():
            buffer.copy_(source[name])

    def state_dict(self) -> dict:
        """This rank's shards: `shadow[i]` holds parameter `names[i]` from position `starts[i]` of its
        flattened local shard on."""
        return {"names": self.names, "shadow": self.shadow, "starts": [start for start, _ in self.layout],
                "buffers": self.buffers, "buffer_averages": self.buffer_averages}

    def load_state_dict(self, state: dict) -> None:
        """This rank's shards as `state_dict` wrote them, from a checkpoint of the same layout."""
        if (state["names"], state["starts"], [len(t) for t in state["shadow"]]) != (
                self.names, [start for start, _ in self.layout], [len(t) for t in self.shadow]):
            raise ValueError("the EMA shards in the checkpoint do not fit this layout's partition of the model")
        for mine, saved in zip(self.shadow, state["shadow"]):
            mine.copy_(saved)
        averages = state.get("buffer_averages", state["buffers"])  # older checkpoints: start from the copies
        for name, buffer in self.buffers.items():
            buffer.copy_(state["buffers"][name])
            self.buffer_averages[name].copy_(averages[name])

    @torch.no_grad()
    def load_full(self, model, weights: dict[str, torch.Tensor]) -> None:
        """This rank's shards from whole-model EMA tensors (and buffers) by name (a consolidated checkpoint)."""
        for (name, param), (start, _), shadow in zip(model.named_parameters(), self.layout, self.shadow, strict=True):
            local = local_shard(param, weights[name], self.groups).reshape(-1)
            shadow.copy_(local[start:start + len(shadow)])
        for name, buffer in self.buffers.items():
            buffer.copy_(weights[name])
            self.buffer_averages[name].copy_(weights.get(averaged_name(name), weights[name]))

