"""The DeepSpeed engine around a model: configuration dict, optimizer and schedule."""
import deepspeed
import torch

from ..config import Config


def deepspeed_config(config: Config, world_size: int) -> dict:
    return {
        "train_batch_size": config.train.global_batch_size,
        "train_micro_batch_size_per_gpu": config.train.global_batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {"stage": config.parallel.zero_stage},
        "steps_per_print": 2**62,  # progress is ours to print
        "wall_clock_breakdown": False,
    }


def build_optimizer(config: Config, params) -> torch.optim.Optimizer:
    """AdamW: NVIDIA apex's fused kernel when importable on a GPU, torch's otherwise."""
    optim = config.optim
    kwargs = dict(lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    if torch.cuda.is_available():
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(params, adam_w_mode=True, **kwargs)
        except ImportError:
            pass
    return torch.optim.AdamW(params, **kwargs)


def warmup_schedule(optimizer, warmup_steps: int):
    """Linear warmup to the configured lr over `warmup_steps`, then constant (as DiT)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(warmup_steps, 1)))


def build_engine(config: Config, model: torch.nn.Module, world_size: int):
    optimizer = build_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=warmup_schedule(optimizer, config.optim.warmup_steps),
        config=deepspeed_config(config, world_size),
    )
    return engine, optimizer, scheduler
