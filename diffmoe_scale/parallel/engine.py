"""The DeepSpeed engine around a model: configuration dict, optimizer, schedule and gradient norm."""
import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import configure_moe_param_groups, is_moe_param

from ..config import Config
from .groups import ParallelGroups
from .precision import deepspeed_precision
from .timeouts import apply_collective_timeout


def clips_in_engine(config: Config) -> bool:
    """Whether DeepSpeed clips the gradients. Its fp32 path without ZeRO averages per-rank norms,
    which is wrong once ranks hold different experts, so there we clip with `clip_grad_norm_`."""
    return config.parallel.zero_stage > 0 or config.train.precision != "fp32"


def deepspeed_config(config: Config, dp_size: int) -> dict:
    return {
        "train_batch_size": config.train.global_batch_size,
        "train_micro_batch_size_per_gpu": config.train.global_batch_size // (dp_size * config.train.grad_accum_steps),
        "gradient_accumulation_steps": config.train.grad_accum_steps,
        "gradient_clipping": config.optim.grad_clip if clips_in_engine(config) else 0.0,
        # DeepSpeed's MoE support in ZeRO 1/2 requires contiguous gradients and reduce-scatter.
        "zero_optimization": {"stage": config.parallel.zero_stage, "contiguous_gradients": True,
                              "reduce_scatter": True, "overlap_comm": config.parallel.overlap_comm,
                              "reduce_bucket_size": config.parallel.reduce_bucket_size,
                              "allgather_bucket_size": config.parallel.allgather_bucket_size},
        **deepspeed_precision(config.train.precision),
        "steps_per_print": 2**62,  # progress is ours to print
        "wall_clock_breakdown": False,
    }


def build_optimizer(config: Config, param_groups, device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW, with its fused kernel on a GPU (one launch per parameter group and step; it keeps
    Adam's step per parameter, as consolidation reads it)."""
    optim = config.optim
    return torch.optim.AdamW(param_groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay,
                             fused=device.type == "cuda" or None)


def warmup_schedule(optimizer, warmup_steps: int):
    """Linear warmup to the configured lr over `warmup_steps`, then constant (as DiT)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(warmup_steps, 1)))


def build_engine(config: Config, model: torch.nn.Module, groups: ParallelGroups):
    """(engine, lr schedule). The schedule is not DeepSpeed's to step: the trainer steps it after each
    applied update (a skipped NaN/Inf step leaves it where it was, whichever optimizer ran)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Expert parameters get optimizer groups of their own: ZeRO partitions them within their
    # expert-data-parallel group.
    param_groups = configure_moe_param_groups(params) if any(is_moe_param(p) for p in params) else params
    optimizer = build_optimizer(config, param_groups, params[0].device)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(config, groups.dp_size), mpu=groups.mpu)
    apply_collective_timeout(config.parallel.timeout_minutes)  # the groups DeepSpeed made for the engine
    optimizer = getattr(optimizer, "optimizer", optimizer)  # ZeRO and bf16 wrap the torch optimizer
    return engine, warmup_schedule(optimizer, config.optim.warmup_steps)


def grad_square_sums(model: torch.nn.Module, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Sum of squared gradient entries of the whole model by parameter kind, each parameter counted
    once: replicated ones from this rank, tensor-parallel shards summed over the TP group, expert
    shards over the EP group."""
    squares = {"replicated": [], "tensor_parallel": [], "expert": []}
    device = next(model.parameters()).device
    for param in model.parameters():
        if param.grad is None:
            continue
        kind = "expert" if is_moe_param(param) else (
            "tensor_parallel" if getattr(param, "tensor_model_parallel", False) else "replicated")
        squares[kind].append(param.grad.detach().float().pow(2).sum())
    total = {kind: torch.stack(values).sum() if values else torch.zeros((), device=device) for kind, values in squares.items()}
    if groups.ep_size > 1:
        dist.all_reduce(total["expert"], group=groups.ep_group)
    if groups.tp_size > 1:
        dist.all_reduce(total["tensor_parallel"], group=groups.mpu.get_tensor_model_parallel_group())
    return total


@torch.no_grad()
def clip_grad_norm_(model: torch.nn.Module, max_norm: float, groups: ParallelGroups) -> torch.Tensor:
    """Scale the gradients to norm at most max_norm (0: no clipping) as torch does; returns the norm before
    (on the device: the caller reads it with whatever else it needs on the host)."""
    norm = sum(grad_square_sums(model, groups).values()).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)
    return norm
