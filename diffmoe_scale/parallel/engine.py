"""The DeepSpeed engine around a model: configuration dict, optimizer, schedule and gradient norm."""
import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import configure_moe_param_groups, is_moe_param

from ..config import Config
from .groups import ParallelGroups
from .timeouts import apply_collective_timeout

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def clips_in_engine(config: Config) -> bool:
    """Whether DeepSpeed clips the gradients. Its fp32 path without ZeRO averages per-rank norms,
    which is wrong once ranks hold different experts, so there we clip with `clip_grad_norm_`."""
    return config.parallel.zero_stage > 0 or config.train.precision != "fp32"


def deepspeed_config(config: Config, dp_size: int) -> dict:
    precision = config.train.precision
    return {
        "train_batch_size": config.train.global_batch_size,
        "train_micro_batch_size_per_gpu": config.train.global_batch_size // (dp_size * config.train.grad_accum_steps),
        "gradient_accumulation_steps": config.train.grad_accum_steps,
        "gradient_clipping": config.optim.grad_clip if clips_in_engine(config) else 0.0,
        # DeepSpeed's MoE support in ZeRO 1/2 requires contiguous gradients and reduce-scatter.
        "zero_optimization": {"stage": config.parallel.zero_stage, "contiguous_gradients": True,
                              "reduce_scatter": True},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**62,  # progress is ours to print
        "wall_clock_breakdown": False,
    }


def build_optimizer(config: Config, param_groups) -> torch.optim.Optimizer:
    """AdamW: NVIDIA apex's fused kernel when importable on a GPU, torch's otherwise."""
    optim = config.optim
    kwargs = dict(lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    if torch.cuda.is_available():
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(param_groups, adam_w_mode=True, **kwargs)
        except ImportError:
            pass
    return torch.optim.AdamW(param_groups, **kwargs)


def warmup_schedule(optimizer, warmup_steps: int):
    """Linear warmup to the configured lr over `warmup_steps`, then constant (as DiT)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(warmup_steps, 1)))


def build_engine(config: Config, model: torch.nn.Module, groups: ParallelGroups):
    params = [p for p in model.parameters() if p.requires_grad]
    # Expert parameters get optimizer groups of their own: ZeRO partitions them within their
    # expert-data-parallel group.
    param_groups = configure_moe_param_groups(params) if any(is_moe_param(p) for p in params) else params
    optimizer = build_optimizer(config, param_groups)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=warmup_schedule(optimizer, config.optim.warmup_steps),
        config=deepspeed_config(config, groups.dp_size),
        mpu=groups.mpu,
    )
    apply_collective_timeout(config.parallel.timeout_minutes)  # the groups DeepSpeed made for the engine
    return engine, optimizer, scheduler


def grad_square_sums(model: torch.nn.Module, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Sum of squared gradient entries of the whole model by parameter kind, each parameter counted
    once: replicated ones from this rank, tensor-parallel shards summed over the TP group, expert
    shards over the EP group."""
    squares = {"replicated": [], "tensor_parallel": [], "expert": []}
    for param in model.parameters():
        if param.grad is None:
            continue
        kind = "expert" if is_moe_param(param) else (
            "tensor_parallel" if getattr(param, "tensor_model_parallel", False) else "replicated")
        squares[kind].append(param.grad.detach().float().pow(2).sum())
    total = {kind: torch.stack(values).sum() if values else torch.zeros(()) for kind, values in squares.items()}
    if groups.ep_size > 1:
        dist.all_reduce(total["expert"], group=groups.ep_group)
    if groups.tp_size > 1:
        dist.all_reduce(total["tensor_parallel"], group=groups.mpu.get_tensor_model_parallel_group())
    return total


@torch.no_grad()
def clip_grad_norm_(model: torch.nn.Module, max_norm: float, groups: ParallelGroups) -> float:
    """Scale the gradients to norm at most max_norm (0: no clipping) as torch does; returns the norm before."""
    norm = sum(grad_square_sums(model, groups).values()).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)
    return norm.item()
