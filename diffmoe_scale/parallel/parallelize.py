"""Apply the configured parallelism to a plain model, from outside (as torchtitan's parallelize)."""
import torch

from ..config import Config
from ..models import build_model
from .compile import compile_blocks
from .expert_parallel import apply_expert_parallel
from .groups import ParallelGroups


def apply_activation_checkpointing(model, every: int) -> None:
    """Blocks 0, every, 2*every, ... recompute their forward in backward instead of keeping activations."""
    for index, block in enumerate(model.blocks):
        block.checkpoint = index % every == 0


def parallelize(model, config: Config, groups: ParallelGroups):
    if groups.tp_size > 1:
        from .tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, groups)
    apply_expert_parallel(model, groups)
    if config.parallel.activation_checkpointing:
        apply_activation_checkpointing(model, config.parallel.activation_checkpointing_every)
    if config.train.compile:
        compile_blocks(model)
    return model


def build_parallel_model(config: Config, groups: ParallelGroups, device: torch.device):
    """The model with this rank's shards, all on `device`. Every rank builds the same full model from
    the seed on the CPU first, so the shards of all ranks are slices of one model whatever the device
    (and two calls give the same weights); the shards are cut on the device."""
    torch.manual_seed(config.train.seed)
    return parallelize(build_model(config).to(device), config, groups)
