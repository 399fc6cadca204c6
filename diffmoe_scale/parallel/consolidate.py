"""A rank's shards of whole-model tensors (expert shards over EP, TP shards over TP): how a checkpoint
consolidated into whole tensors (train/consolidation.py) resumes in any parallel layout."""
import torch
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

from .groups import ParallelGroups

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def local_shard(param: torch.nn.Parameter, full: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """This rank's part of a whole-model tensor, laid out as `param` is sharded."""
    if is_moe_param(param) and groups.ep_size > 1:
        local = full.shape[0] // groups.ep_size
        full = full.narrow(0, groups.ep_rank * local, local)
    if hasattr(param, "tp_index") and groups.tp_size > 1:
        full = full.index_select(param.partition_dim, param.tp_index.to(full.device))
    return full


def persistent_buffers(model) -> dict[str, torch.Tensor]:
    """The buffers a state dict holds (replicated on every rank, e.g. DiffMoE thresholds)."""
    return {f"{prefix}.{name}".lstrip("."): buffer for prefix, module in model.named_modules()
            for name, buffer in module.named_buffers(recurse=False) if name not in module._non_persistent_buffers_set}


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    return getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO and bf16 wrap the torch optimizer


def _master(param) -> bool:
    """Whether DeepSpeed keeps an fp32 master copy and the optimizer state apart from `param` (ZeRO, bf16)."""
    return hasattr(param, "_hp_mapping")


def _link_optimizer_state(engine) -> None:
    """Make the Adam state exist and DeepSpeed's per-parameter views of it linked: both happen lazily at the
    first optimizer step, and a consolidated checkpoint is loaded before one."""
    optimizer = _torch_optimizer(engine)
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")  # where torch's AdamW keeps its step
        for flat in group["params"]:
            if not optimizer.state[flat]:
                step = torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu")
                optimizer.state[flat].update(step=step, exp_avg=torch.zeros_like(flat),
                                             exp_avg_sq=torch.zeros_like(flat))
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO 1/2 and bf16
    if link is not None:
        link()


@torch.no_grad()
def load_full_training_state(engine, model, groups: ParallelGroups, state: dict) -> None:
    """Set this rank's shards of the weights (fp32 masters included) and Adam state from whole tensors."""
    _link_optimizer_state(engine)
    optimizer = _torch_optimizer(engine)
    for name, param in model.named_parameters():
        weight = local_shard(param, state["params"][name], groups)
        param.copy_(weight)
        moments = {key: local_shard(param, state["moments"][name][key], groups).clone() for key in ADAM_MOMENTS}
        if _master(param):
            safe_set_full_fp32_param(param, weight.float())
            for key, value in moments.items():
                safe_set_full_optimizer_state(param, value, key)
        else:
            optimizer.state[param].update(moments)
    for param_state in optimizer.state.values():  # torch's AdamW keeps the step per parameter, fused or not
        param_state["step"].fill_(state["adam_step"])
