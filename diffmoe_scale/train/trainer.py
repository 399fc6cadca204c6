"""The training loop: DeepSpeed engine, EMA, metrics, end-of-run sample grid, clean Ctrl-C."""
import resource
import signal
import time
from pathlib import Path

import torch

from ..config import Config, ConfigError, dump_config
from ..data import ShuffledBatchSampler, build_dataset
from ..diffusion import build_objective
from ..models import build_model
from ..parallel.collectives import all_gather, any_rank, average_over_ranks
from ..parallel.engine import PRECISION_DTYPES, build_engine, clip_grad_norm_, clips_in_engine
from ..parallel.expert_parallel import apply_threshold_quantiles, rows_sent_to_other_ranks, take_pending_quantiles
from ..parallel.groups import setup_groups
from ..parallel.parallelize import parallelize
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


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average per-rank scalars over every rank: the global batch's loss from the local batches' means."""
    stacked = torch.stack([value.detach().float() for value in values.values()])
    return dict(zip(values, average_over_ranks(stacked).tolist()))


def check_precision(config: Config) -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if config.train.precision == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError(f"train.precision: fp16 needs an accelerator with fp16 support; DeepSpeed's "
                          f"{accelerator.device_name()} accelerator has none here: use bf16 or fp32")
    if config.train.precision == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError(f"train.precision: DeepSpeed's {accelerator.device_name()} accelerator has no bf16 support "
                          f"here: use fp32")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    def __init__(self, config: Config, runtime: Runtime):
        self.config = config
        self.runtime = runtime
        self.out_dir = Path(config.train.out_dir)
        check_precision(config)
        self.groups = groups = setup_groups(config)
        self.dataset = build_dataset(config)
        self.model = self.build_parallel_model()
        self.ema = EMA(self.build_parallel_model(), config.train.ema_decay)
        self.objective = build_objective(config)
        self.engine, _, self.scheduler = build_engine(config, self.model, groups)
        self.dtype = PRECISION_DTYPES[config.train.precision]
        self.sampler = ShuffledBatchSampler(
            len(self.dataset), config.train.global_batch_size, config.train.seed, groups.dp_rank, groups.dp_size
        )
        # Noise, timesteps and label dropout: drawn for the whole global batch (see next_rank_batch).
        self.generator = torch.Generator(device=runtime.device).manual_seed(config.train.seed * 1000 + 1)
        self.step = 0
        self.weights = loss_weights(config)
        self.rows_sent_logged = 0  # all-to-all rows sent to other ranks up to the last metrics record
        self.tokens_per_image = (config.model.input_size // config.model.patch_size) ** 2

    def build_parallel_model(self):
        """The model with this rank's shards. Every rank builds the same full model from the seed
        first, so the shards of all ranks are slices of one model (and two calls give the same weights)."""
        torch.manual_seed(self.config.train.seed)
        model = build_model(self.config).to(self.runtime.device)
        return parallelize(model, self.config, self.groups)

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
        groups, config = self.groups, self.config
        print(f"model: {params / 1e6:.2f}M parameters on rank 0, {len(self.model.moe_layers())} MoE layers "
              f"({config.moe.ffn}); {groups.world_size} ranks ({self.runtime.launcher}): "
              f"dp {groups.dp_size} x tp {groups.tp_size}, ep {groups.ep_size}, ZeRO {config.parallel.zero_stage}, "
              f"{config.train.precision}; run directory {self.out_dir}", flush=True)

    def next_rank_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's rows of the next global batch: images, labels and their random draws.

        Noise, timesteps and label-dropout bits are drawn for the whole global batch on every rank
        and each rank keeps its rows, so a sample's numbers do not depend on the parallel layout."""
        config, groups = self.config, self.groups
        indices, flips = self.sampler.next_indices()
        images, labels = self.dataset.batch(indices, flips)
        size = config.model.input_size
        shape = (config.train.global_batch_size, config.model.in_channels, size, size)
        noise, t = self.objective.draw(shape, self.generator, self.dtype)
        drop = torch.rand(shape[0], generator=self.generator, device=self.generator.device) < config.model.class_dropout
        own = slice(groups.dp_rank * len(indices), (groups.dp_rank + 1) * len(indices))
        draws = {"noise": noise[own], "t": t[own], "drop": drop[own]}
        return images.to(self.runtime.device, self.dtype), labels.to(self.runtime.device), draws

    def forward_backward(self, images, labels, draws: dict) -> dict[str, torch.Tensor]:
        """One micro-batch forward and backward; returns its (unweighted) losses."""
        labels = torch.where(draws["drop"], torch.full_like(labels, self.config.model.num_classes), labels)
        losses = self.objective.training_losses(self.engine, images, labels, draws["noise"], draws["t"])
        total = sum(self.weights.get(name, 1.0) * value for name, value in losses.items())
        self.engine.backward(total)
        return losses

    def train_step(self) -> tuple[dict[str, torch.Tensor], float]:
        """One optimizer step over this rank's rows of the global batch, in micro-batches.

        Returns this rank's losses (mean over its micro-batches) and the gradient norm before clipping."""
        config, accum = self.config, self.config.train.grad_accum_steps
        images, labels, draws = self.next_rank_batch()
        micro = len(images) // accum
        losses, quantiles, grad_norm = {}, 0, None
        for i in range(accum):
            rows = slice(i * micro, (i + 1) * micro)
            micro_losses = self.forward_backward(images[rows], labels[rows], {k: v[rows] for k, v in draws.items()})
            for name, value in micro_losses.items():
                losses[name] = losses.get(name, 0) + value.detach() / accum
            quantiles = quantiles + take_pending_quantiles(self.model)
            if i == accum - 1 and not clips_in_engine(config):
                grad_norm = clip_grad_norm_(self.model, config.optim.grad_clip, self.groups)
            self.engine.step()  # DeepSpeed steps the optimizer after the last micro-batch only
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        apply_threshold_quantiles(self.model, quantiles / accum)
        self.ema.update(self.model)
        self.step += 1
        return losses, float(grad_norm)

    def train(self) -> int:
        """Runs to train.max_steps; returns the process exit code."""
        config = self.config
        self.prepare_run_dir()
        log = MetricsLog(self.out_dir / "metrics.jsonl", config.train.max_steps, self.runtime.is_main)
        stop = StopRequest()
        try:
            window_start, window_steps = time.perf_counter(), 0
            while self.step < config.train.max_steps and not any_rank(stop.requested):  # all ranks stop together
                losses, grad_norm = self.train_step()
                window_steps += 1
                if self.step % config.logging.every_steps == 0 or self.step == config.train.max_steps:
                    elapsed = time.perf_counter() - window_start
                    step_time = elapsed / window_steps
                    log.log(self.metrics_record(mean_over_ranks(losses), grad_norm, window_steps, step_time))
                    window_start, window_steps = time.perf_counter(), 0
        finally:
            stop.restore()
            log.close()
        if self.step < config.train.max_steps:
            print(f"interrupted at step {self.step}; metrics are in {self.out_dir / 'metrics.jsonl'}", flush=True)
            return INTERRUPTED_EXIT_CODE
        self.save_samples(self.out_dir / "samples.png")
        return 0

    def metrics_record(self, losses: dict, grad_norm: float, window_steps: int, step_time: float) -> dict:
        c_avg, capacity = capacity_stats(self.model)
        images_per_s = self.config.train.global_batch_size / step_time
        rows_sent = rows_sent_to_other_ranks(self.model)
        # The backward all-to-alls move as many rows as the forward ones.
        a2a_bytes = 2 * (rows_sent - self.rows_sent_logged) * self.config.model.hidden_size * self.dtype.itemsize
        self.rows_sent_logged = rows_sent
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
            "all_to_all_mb": a2a_bytes / window_steps / 2**20,  # this rank to the others, per step
        }

    @torch.no_grad()
    def sample_images(self, labels: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """Class-conditional samples from the EMA weights, every rank taking part (experts are sharded):
        each data-parallel rank samples its slice of the batch. Returns (images on every rank, C_avg)."""
        config, model, groups = self.config, self.ema.model, self.groups
        padded = -len(labels) % groups.dp_size  # repeat the last sample so the batch splits evenly
        labels = torch.cat([labels, labels[-1:].expand(padded)])
        noise = torch.cat([noise, noise[-1:].expand(padded, *noise.shape[1:])])
        share = len(labels) // groups.dp_size
        rows = slice(groups.dp_rank * share, (groups.dp_rank + 1) * share)
        layer_c_avgs = []  # C_avg of every MoE layer call during sampling
        hooks = [layer.register_forward_hook(lambda m, *_: layer_c_avgs.append(m.capacity_per_expert().mean().item()))
                 for layer in model.moe_layers()]
        try:
            images = self.objective.sample(model, noise[rows], labels[rows], steps=config.sample.steps,
                                           sampler=config.sample.sampler, cfg_scale=config.sample.cfg_scale)
        finally:
            for hook in hooks:
                hook.remove()
        images = torch.cat(all_gather(images)[:: groups.tp_size])  # one copy per data-parallel rank
        c_avg = sum(layer_c_avgs) / len(layer_c_avgs) if layer_c_avgs else None
        return images[: len(images) - padded], c_avg

    def save_samples(self, path: Path) -> None:
        """One row per class of class-conditional samples from the EMA weights."""
        config, device = self.config, self.runtime.device
        per_class, num_classes = config.sample.per_class, config.model.num_classes
        generator = torch.Generator(device=device).manual_seed(config.sample.seed)
        labels = torch.arange(num_classes, device=device).repeat_interleave(per_class)
        size = config.model.input_size
        noise = torch.randn(len(labels), config.model.in_channels, size, size, generator=generator, device=device)
        torch.manual_seed(config.sample.seed)  # ancestral sampling draws from the global RNG
        images, c_avg = self.sample_images(labels, noise)
        if not self.runtime.is_main:
            return
        save_grid(images, rows=num_classes, path=path)
        c_avg = f", inference C_avg {c_avg:.2f}" if c_avg is not None else ""
        print(f"samples: {path} ({len(labels)} images, {config.sample.sampler} {config.sample.steps} steps, "
              f"cfg {config.sample.cfg_scale}{c_avg})", flush=True)
