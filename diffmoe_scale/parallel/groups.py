"""Process groups: data parallel (DP), expert parallel (EP), expert-data parallel, tensor parallel (TP).

Ranks are laid out TP-innermost: the TP group of rank r is the `tp` consecutive ranks around it
(megatron-core's `parallel_state` owns it), and DP runs across TP groups. Among the DP ranks with
one TP rank, DeepSpeed's expert groups take `ep` consecutive DP ranks as one EP group (they share
a token pool and split the experts) and the ranks holding the same expert shard as one
expert-data-parallel group (their expert gradients are averaged together).
"""
from dataclasses import dataclass

import torch.distributed as dist

from ..config import Config, ConfigError
from .timeouts import apply_collective_timeout


@dataclass
class ParallelGroups:
    world_size: int
    dp_size: int
    dp_rank: int
    tp_size: int
    ep_size: int
    ep_rank: int
    ep_group: object  # torch ProcessGroup: the ranks of one token pool
    expert_group_name: str  # DeepSpeed's name for this EP size ("ep_size_<ep>")
    mpu: object = None  # megatron-core parallel_state when tp > 1, for DeepSpeed


def check_layout(config: Config, world_size: int) -> None:
    """The world must split into TP x DP and DP into EP groups; each DP rank gets whole samples."""
    parallel = config.parallel
    if world_size % parallel.tp:
        raise ConfigError(f"parallel.tp: {parallel.tp} does not divide the {world_size} ranks")
    dp_size = world_size // parallel.tp
    if dp_size % parallel.ep:
        raise ConfigError(f"parallel.ep: {parallel.ep} does not divide the data-parallel size {dp_size} "
                          f"({world_size} ranks / tp {parallel.tp})")
    micro_batches = dp_size * config.train.grad_accum_steps
    if config.train.global_batch_size % micro_batches:
        raise ConfigError(f"train.global_batch_size: {config.train.global_batch_size} does not split into "
                          f"{micro_batches} micro-batches ({dp_size} data-parallel ranks x "
                          f"train.grad_accum_steps {config.train.grad_accum_steps})")


def setup_groups(config: Config) -> ParallelGroups:
    from deepspeed.utils import groups as ds_groups

    world_size = dist.get_world_size()
    check_layout(config, world_size)
    tp, ep = config.parallel.tp, config.parallel.ep
    mpu = None
    if tp > 1:
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 distributed_timeout_minutes=config.parallel.timeout_minutes)
        mpu = MegatronMPU(parallel_state)
        ds_groups._create_expert_data_and_model_parallel(ep, mpu)
        dp_rank = parallel_state.get_data_parallel_rank()
    else:
        ds_groups._create_expert_and_data_parallel(ep)
        dp_rank = dist.get_rank()
    apply_collective_timeout(config.parallel.timeout_minutes)  # the world's and DeepSpeed's groups
    name = f"ep_size_{ep}"
    return ParallelGroups(
        world_size=world_size, dp_size=world_size // tp, dp_rank=dp_rank, tp_size=tp, ep_size=ep,
        ep_rank=ds_groups._get_expert_parallel_rank(name), ep_group=ds_groups._get_expert_parallel_group(name),
        expert_group_name=name, mpu=mpu,
    )


class MegatronMPU:
    """megatron-core's parallel_state under the names DeepSpeed asks an `mpu` for: its own names for
    the data- and tensor-parallel groups, and "model parallel" meaning tensor parallel here."""

    def __init__(self, parallel_state):
        self.state = parallel_state

    def __getattr__(self, name):
        return getattr(self.state, name)

    def get_model_parallel_rank(self):
        return self.state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.state.get_tensor_model_parallel_group()
