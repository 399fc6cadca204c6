"""Whole-model tensors gathered by the ranks of a training process, through the DeepSpeed engine: the reference
the equivalence tests compare layouts with, and the one `train/consolidation.py` (which reads a checkpoint's
files in one process) is checked against."""
import torch
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from diffmoe_scale.parallel.collectives import all_gather
from diffmoe_scale.parallel.consolidate import ADAM_MOMENTS, _link_optimizer_state, _master, _torch_optimizer, \
    persistent_buffers
from diffmoe_scale.train.ema_thresholds import averaged_name


def full_tensor(param, tensor: torch.Tensor, groups) -> torch.Tensor:
    """The whole-model version of `tensor` (the parameter itself, its gradient or an EMA copy), laid out as
    `param` is sharded. Collective over the groups involved."""
    if is_moe_param(param) and groups.ep_size > 1:
        tensor = torch.cat(all_gather(tensor, groups.ep_group))  # experts in EP rank order
    if hasattr(param, "tp_index") and groups.tp_size > 1:
        tp_group = groups.mpu.get_tensor_model_parallel_group()
        dim = param.partition_dim
        index = torch.cat(all_gather(param.tp_index.to(tensor.device), tp_group))
        shards = torch.cat(all_gather(tensor, tp_group), dim=dim)
        tensor = torch.empty_like(shards).index_copy_(dim, index, shards)
    return tensor


def full_state(model, groups, tensor_of=lambda param: param) -> dict[str, torch.Tensor]:
    """name -> whole tensor of `tensor_of(param)` for every parameter (skipping those it maps to None)."""
    return {name: full_tensor(param, tensor_of(param).detach(), groups)
            for name, param in model.named_parameters() if tensor_of(param) is not None}


def gathered_state(trainer) -> dict:
    """The whole training state in the consolidated layout, gathered by every rank (collective)."""
    engine, model, groups = trainer.engine, trainer.model, trainer.groups
    # ZeRO 2 steps its parameter groups one at a time and links its per-parameter views of the Adam state after
    # the first, before the later groups have state: link again.
    engine.optimizer._hp_optimizer_states_linked = False
    _link_optimizer_state(engine)
    optimizer = _torch_optimizer(engine)
    params, moments = {}, {}
    for name, param in model.named_parameters():
        weight = safe_get_full_fp32_param(param) if _master(param) else param.detach().float()
        params[name] = full_tensor(param, weight, groups)
        moments[name] = {key: full_tensor(param, safe_get_full_optimizer_state(param, key) if _master(param)
                                          else optimizer.state[param][key], groups) for key in ADAM_MOMENTS}
    steps = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    ema_model = trainer.filled_ema_model()
    buffers = {name: buffer.clone() for name, buffer in persistent_buffers(model).items()}
    ema_buffers = {}  # copied and averaged, as filled into a model
    for mode in ("copy", "average"):
        trainer.ema.fill(ema_model, mode)
        ema_buffers.update({name if mode == "copy" else averaged_name(name): buffer.clone()
                            for name, buffer in persistent_buffers(ema_model).items()})
    return {"params": params, "moments": moments, "adam_step": max(steps, default=0), "buffers": buffers,
            "ema": {**full_state(ema_model, groups), **ema_buffers}, "trainer": trainer.trainer_state()}
