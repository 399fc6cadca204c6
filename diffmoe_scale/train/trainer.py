"""The training loop: DeepSpeed engine, EMA, metrics, end-of-run sample grid, clean Ctrl-C."""
import resource
import signal
import time
from pathlib import Path

import torch

from ..config import Config, dump_config
from ..data import ShuffledBatchSampler, build_dataset
from ..diffusion import build_objective
from ..models import build_model
from ..parallel.engine import build_engine
from ..parallel.runtime import Runtime
from .ema import EMA
from .images import save_grid
from .metrics import MetricsLog

INTERRUPTED_EXIT_CODE = 130


class StopRequest:
    """Turns the first SIGINT into a request to stop at the next step boundary; a second one aborts."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after this step (Ctrl-C again to abort now)", flush=True)

    def restore(self):
        signal.signal(signal.SIGINT, self._previous)


def loss_weights(config: Config) -> dict[str, float]:
    """Weight of each loss term the model and objective return; anything else weighs 1."""
    return {"predictor": config.moe.predictor_loss_weight, "balance": config.moe.balance_loss_weight}


def capacity_stats(model) -> tuple[float, list[list[float]]]:
    """(C_avg over MoE layers, per layer per expert C^e) of the last forward; (1, []) when dense."""
    per_layer = [layer.capacity_per_expert() for layer in model.moe_layers()]
    if not per_layer:
        return 1.0, []
    table = torch.stack(per_layer)
    return table.mean().item(), table.tolist()


def local_grad_norm(model) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).item()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    def __init__(self, config: Config, runtime: Runtime):
        self.config = config
        self.runtime = runtime
        self.out_dir = Path(config.train.out_dir)
        self.dataset = build_dataset(config)
        torch.manual_seed(config.train.seed)
        self.model = build_model(config).to(runtime.device)
        self.objective = build_objective(config)
        self.engine, _, self.scheduler = build_engine(config, self.model, runtime.world_size)
        self.ema = EMA(self.model, config.train.ema_decay)
        self.sampler = ShuffledBatchSampler(
            len(self.dataset), config.train.global_batch_size, config.train.seed, runtime.rank, runtime.world_size
        )
        # Noise, timesteps and label dropout: a stream per rank, independent of the global RNG.
        self.generator = torch.Generator(device=runtime.device).manual_seed(config.train.seed * 1000 + runtime.rank + 1)
        self.step = 0
        self.weights = loss_weights(config)
        self.tokens_per_image = (config.model.input_size // config.model.patch_size) ** 2

    def prepare_run_dir(self) -> None:
        if not self.runtime.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.out_dir / "metrics.jsonl"
        if metrics.exists():
            print(f"warning: {metrics} exists; starting a fresh run, its old lines are replaced", flush=True)
            metrics.unlink()
        dump_config(self.config, self.out_dir / "config.yaml")
        params = sum(p.numel() for p in self.model.parameters())
        print(f"model: {params / 1e6:.2f}M parameters, {len(self.model.moe_layers())} MoE layers "
              f"({self.config.moe.ffn}); run directory {self.out_dir}", flush=True)

    def train_step(self) -> dict:
        config = self.config
        indices, flips = self.sampler.next_indices()
        images, labels = self.dataset.batch(indices, flips)
        images, labels = images.to(self.runtime.device), labels.to(self.runtime.device)
        drop = torch.rand(labels.shape, generator=self.generator, device=labels.device) < config.model.class_dropout
        labels = torch.where(drop, torch.full_like(labels, config.model.num_classes), labels)

        losses = self.objective.training_losses(self.engine, images, labels, generator=self.generator)
        total = sum(self.weights.get(name, 1.0) * value for name, value in losses.items())
        self.engine.backward(total)
        # ZeRO optimizers report the (pre-clipping) norm after step; without ZeRO, read it from .grad now.
        grad_norm = None if self.engine.zero_optimization() else local_grad_norm(self.model)
        self.engine.step()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        self.ema.update(self.model)
        self.step += 1
        return {name: value.item() for name, value in losses.items()}, float(grad_norm)

    def train(self) -> int:
        """Runs to train.max_steps; returns the process exit code."""
        config = self.config
        self.prepare_run_dir()
        log = MetricsLog(self.out_dir / "metrics.jsonl", config.train.max_steps, self.runtime.is_main)
        stop = StopRequest()
        try:
            window_start, window_steps = time.perf_counter(), 0
            while self.step < config.train.max_steps and not stop.requested:
                losses, grad_norm = self.train_step()
                window_steps += 1
                if self.step % config.logging.every_steps == 0 or self.step == config.train.max_steps:
                    elapsed = time.perf_counter() - window_start
                    log.log(self.metrics_record(losses, grad_norm, elapsed / window_steps))
                    window_start, window_steps = time.perf_counter(), 0
        finally:
            stop.restore()
            log.close()
        if stop.requested:
            print(f"interrupted at step {self.step}; metrics are in {self.out_dir / 'metrics.jsonl'}", flush=True)
            return INTERRUPTED_EXIT_CODE
        if self.runtime.is_main:
            self.save_samples(self.out_dir / "samples.png")
        return 0

    def metrics_record(self, losses: dict, grad_norm: float, step_time: float) -> dict:
        c_avg, capacity = capacity_stats(self.model)
        images_per_s = self.config.train.global_batch_size / step_time
        return {
            "step": self.step,
            "loss": losses["diffusion"],
            **{f"{name}_loss": value for name, value in losses.items() if name != "diffusion"},
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "c_avg": c_avg,
            "capacity": capacity,
            "step_time_s": step_time,
            "images_per_s": images_per_s,
            "tokens_per_s": images_per_s * self.tokens_per_image,
            "peak_memory_mb": peak_memory_mb(self.runtime.device),
        }

    @torch.no_grad()
    def save_samples(self, path: Path) -> None:
        """One row per class of class-conditional samples from the EMA weights."""
        config, model = self.config, self.ema.model
        per_class, num_classes = config.sample.per_class, config.model.num_classes
        generator = torch.Generator(device=self.runtime.device).manual_seed(config.sample.seed)
        labels = torch.arange(num_classes, device=self.runtime.device).repeat_interleave(per_class)
        size = config.model.input_size
        noise = torch.randn(len(labels), config.model.in_channels, size, size, generator=generator, device=self.runtime.device)
        torch.manual_seed(config.sample.seed)  # ancestral sampling draws from the global RNG
        layer_c_avgs = []  # C_avg of every MoE layer call during sampling
        hooks = [layer.register_forward_hook(lambda m, *_: layer_c_avgs.append(m.capacity_per_expert().mean().item()))
                 for layer in model.moe_layers()]
        try:
            images = self.objective.sample(model, noise, labels, steps=config.sample.steps,
                                           sampler=config.sample.sampler, cfg_scale=config.sample.cfg_scale)
        finally:
            for hook in hooks:
                hook.remove()
        save_grid(images, rows=num_classes, path=path)
        c_avg = f", inference C_avg {sum(layer_c_avgs) / len(layer_c_avgs):.2f}" if layer_c_avgs else ""
        print(f"samples: {path} ({len(labels)} images, {config.sample.sampler} {config.sample.steps} steps, "
              f"cfg {config.sample.cfg_scale}{c_avg})", flush=True)
