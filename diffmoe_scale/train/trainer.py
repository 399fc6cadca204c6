"""The training loop: DeepSpeed engine, EMA, metrics, sample grids, clean Ctrl-C."""
import os
import resource
import time
import uuid
from pathlib import Path

import torch

from ..config import Config, ConfigError, dump_config
from ..data import ShuffledBatchSampler, build_dataset
from ..diffusion import build_objective
from ..parallel.collectives import average_over_ranks, barrier, broadcast_object, max_over_ranks
from ..parallel.consolidate import load_full_training_state, persistent_buffers
from ..parallel.engine import build_engine
from ..parallel.expert_parallel import apply_threshold_quantiles, rows_sent_to_other_ranks, take_pending_quantiles
from ..parallel.groups import setup_groups
from ..parallel.parallelize import build_parallel_model
from ..parallel.precision import PRECISION_DTYPES, CastAtModelBoundary, enable_tf32, use_deterministic_algorithms
from ..parallel.runtime import Runtime
from .batches import dropped_labels, rank_batch
from .calibration import calibrate_thresholds
from .capacity import CapacityByCondition
from .checkpoint import (SHARDED, atomic_torch_save, atomic_write_text, capture_rng, code_version, find_resumable,
                         is_checkpoint, layout_mismatch, prune, publish, rank_state_name, read_consolidated,
                         restore_rng, set_aside, tag_for, verify)
from .disk_space import ensure_room, reporting_write_errors
from .efficiency import Efficiency, training_flops_per_image
from .ema import ShardedEMA
from .ema_thresholds import buffers_to_fill
from .faults import inject as inject_fault
from .faults import planned as planned_fault
from .health import StepHealth, nonfinite_losses
from .metrics import MetricsLog, cut_metrics_after
from .periodic_samples import SampleGrids
from .resume_policy import ResumeRule, describe_pool
from .run_identity import resumed_identity
from .stop import StopRequest
from .timing import StepTimer
from .watchdog import StallWatchdog
from .wandb_run import WandbRun

EXIT_UNHEALTHY = 3  # stopped after train.max_nonfinite_steps NaN/Inf steps in a row (not to be requeued)
EXIT_SAVE_FAILED = 4  # a checkpoint could not be written: no room, or an I/O error (not to be requeued)

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
    def __init__(self, config: Config, runtime: Runtime, stop: StopRequest | None = None):
        # First (or already by the entry point, before distributed start-up): a preemption signal during
        # set-up must not kill the job.
        self.stop = stop if stop is not None else StopRequest()
        self.config = config
        self.runtime = runtime
        self.out_dir = Path(config.train.out_dir)
        check_precision(config)
        planned_fault()  # a mistyped DIFFMOE_FAULT fails here, before training
        enable_tf32(config.train.tf32)
        use_deterministic_algorithms(config.train.deterministic)
        self.groups = groups = setup_groups(config)
        self.dataset = build_dataset(config)
        self.model = build_parallel_model(config, groups, runtime.device)
        self.objective = build_objective(config)
        self.engine, self.scheduler = build_engine(config, self.model, groups)
        self.dtype = PRECISION_DTYPES[config.train.precision]
        self.forward_model = CastAtModelBoundary(self.engine, self.dtype)
        self.ema = ShardedEMA(self.model, groups, config.train.ema_decay)
        self.ema_model = None  # the EMA weights as a model, built when first sampled from
        self.grids = SampleGrids(config, groups, runtime.device, self.objective, runtime.is_main)
        self.health = StepHealth(config, self.engine, self.model, groups)
        self.sampler = ShuffledBatchSampler(
            len(self.dataset), config.train.global_batch_size, config.train.seed, groups.dp_rank, groups.dp_size
        )
        self.step = 0
        self.saved_step = None  # step of the newest checkpoint this process wrote or resumed from
        self.run_id = broadcast_object(uuid.uuid4().hex[:12] if runtime.is_main else None)  # kept on resume
        self.branched_from = None  # the source run of a run started from another run's checkpoint
        self.resume_rule = ResumeRule()  # set by `resume`, with the changes it may accept
        self.weights = loss_weights(config)
        self.rows_sent_logged = 0  # all-to-all rows sent to other ranks up to the last metrics record
        self.capacity_by_condition = CapacityByCondition(config.model.num_classes, runtime.device)
        self.tokens_per_image = (config.model.input_size // config.model.patch_size) ** 2
        self.timer = StepTimer(self.model, runtime.device)  # phases of logging steps (train/timing.py)
        flops_per_image = training_flops_per_image(self.model, config, groups.dp_size, self.dtype, runtime.device)
        self.efficiency = Efficiency(config, flops_per_image, groups.world_size, runtime.device)

    def prepare_run_dir(self) -> None:
        if not self.runtime.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.out_dir / "metrics.jsonl"
        if self.saved_step is not None:
            dropped, damaged = cut_metrics_after(metrics, self.step)
            if dropped or damaged:
                print(f"{metrics}: cut back to step {self.step}: dropped {dropped} later record(s) and {damaged} "
                      f"damaged line(s) (torn, not JSON, or without a step)", flush=True)
        elif metrics.exists():
            print(f"warning: starting from step 0; the existing {metrics} was moved to {set_aside(metrics)}",
                  flush=True)
        dump_config(self.config, self.out_dir / "config.yaml")
        params = sum(p.numel() for p in self.model.parameters())
        groups, config = self.groups, self.config
        print(f"model: {params / 1e6:.2f}M parameters on rank 0, {len(self.model.moe_layers())} MoE layers "
              f"({config.moe.ffn}); {groups.world_size} ranks ({self.runtime.launcher}): "
              f"dp {groups.dp_size} x tp {groups.tp_size}, ep {groups.ep_size}, ZeRO {config.parallel.zero_stage}, "
              f"{config.train.precision}; {describe_pool(config.to_dict(), self.layout())}; run directory "
              f"{self.out_dir}", flush=True)

    def next_rank_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's rows of the next global batch (see `rank_batch`)."""
        return rank_batch(self.config, self.dataset, self.objective, self.sampler, self.groups.dp_rank,
                          self.runtime.device, self.config.train.seed)

    def forward_backward(self, images, labels, draws: dict) -> dict[str, torch.Tensor]:
        """One micro-batch forward and backward; returns its (unweighted) losses."""
        conditioning = dropped_labels(labels, draws["drop"], self.config.model.num_classes)
        with self.timer.phase("forward"):
            losses = self.objective.training_losses(self.forward_model, images, conditioning, draws["noise"], draws["t"])
            self.capacity_by_condition.add(self.model, self.objective.noise_level(draws["t"]), labels)
            total = sum(self.weights.get(name, 1.0) * value for name, value in losses.items())
        with self.timer.phase("backward"):
            self.engine.backward(total)
        return losses

    def logs_at(self, step: int) -> bool:
        """Whether `step` is a logging step (its metrics are read and written, its phases timed)."""
        return step % self.config.logging.every_steps == 0 or step == self.config.train.max_steps

    def train_step(self) -> tuple[dict[str, torch.Tensor], float]:
        """One optimizer step over this rank's rows of the global batch, in micro-batches.

        Returns this rank's losses (mean over its micro-batches) and the gradient norm before clipping."""
        accum, health = self.config.train.grad_accum_steps, self.health
        self.timer.start_step(self.logs_at(self.step + 1))
        with self.timer.phase("data"):
            images, labels, draws = self.next_rank_batch()
        micro = len(images) // accum
        losses, quantiles, nonfinite = {}, 0, 0
        for i in range(accum):
            rows = slice(i * micro, (i + 1) * micro)
            micro_losses = self.forward_backward(images[rows], labels[rows], {k: v[rows] for k, v in draws.items()})
            for name, value in micro_losses.items():
                losses[name] = losses.get(name, 0) + value.detach() / accum
            nonfinite = nonfinite + nonfinite_losses(micro_losses)
            quantiles = quantiles + take_pending_quantiles(self.model)
            with self.timer.phase("optimizer"):
                if i == accum - 1:
                    health.decide(nonfinite)
                self.engine.step()  # DeepSpeed steps the optimizer after the last micro-batch only
        applied, grad_norm = health.outcome()
        self.step += 1
        if applied:
            with self.timer.phase("optimizer"):
                self.scheduler.step()
                apply_threshold_quantiles(self.model, quantiles / accum)
                self.ema.update(self.model)
        elif self.runtime.is_main:
            print(f"step {self.step}: NaN/Inf loss or gradients (loss {losses['diffusion'].item():.4g} on rank 0), "
                  f"step skipped ({health.in_a_row} in a row, {health.skipped_steps} in all)", flush=True)
        return losses, grad_norm

    def train(self, resume: str = "auto", allow_change: tuple[str, ...] = ()) -> int:
        """Resumes as `resume` says (see `resume`; `allow_change`: the changes of training maths accepted, see
        resume_policy.py), runs to train.max_steps; returns the exit code."""
        self.watchdog = StallWatchdog(self.runtime.rank, self.config.parallel.stall_warning_minutes * 60)
        try:
            self.watchdog.tick(self.step, "resuming")
            self.resume(resume, allow_change)
            self.prepare_run_dir()
            exit_code = self.run_steps()
            self.watchdog.tick(self.step, "saving a checkpoint")
            self.save_checkpoint()  # the end of the run, or what a stop must not lose
            if exit_code:
                if self.runtime.is_main and exit_code != EXIT_UNHEALTHY:
                    print(f"stopped at step {self.step}; the same command resumes from "
                          f"{self.config.checkpoint_dir}", flush=True)
                return exit_code
            self.watchdog.tick(self.step, "sampling")
            self.grids.write(self.filled_ema_model, self.out_dir / "samples")
            return 0
        finally:
            self.watchdog.close()
            self.stop.restore()  # until here a signal only asks for a stop, during the final save too

    def run_steps(self) -> int:
        """Trains until train.max_steps or a stop request; returns the stop's exit code (0: none)."""
        config, every = self.config, self.config.checkpoint.every_steps
        is_main = self.runtime.is_main
        wandb_run = (WandbRun(config, self.run_id, self.out_dir, self.branched_from)
                     if config.logging.wandb and is_main else None)
        log = MetricsLog(self.out_dir / "metrics.jsonl", config.train.max_steps, is_main, self.step, wandb_run)
        try:
            window_start, window_steps = time.perf_counter(), 0
            while self.step < config.train.max_steps:
                self.watchdog.tick(self.step)
                self.stop.announce()
                exit_code = max_over_ranks(self.stop.exit_code, self.runtime.device)  # all stop at one step
                if exit_code:
                    return exit_code
                losses, grad_norm = self.train_step()
                if self.health.in_a_row >= config.train.max_nonfinite_steps:
                    if self.runtime.is_main:
                        print(f"stopping: {self.health.in_a_row} steps in a row had NaN/Inf gradients (limit "
                              f"train.max_nonfinite_steps); none of them was applied, so the checkpoint now saved "
                              f"holds the last healthy weights. Lower optim.lr or set optim.grad_clip, then resume",
                              flush=True)
                    return EXIT_UNHEALTHY
                window_steps += 1
                if self.logs_at(self.step):
                    elapsed = time.perf_counter() - window_start
                    step_time = elapsed / window_steps
                    log.log(self.metrics_record(mean_over_ranks(losses), grad_norm, window_steps, step_time))
                    window_start, window_steps = time.perf_counter(), 0
                if every and self.step % every == 0:
                    self.watchdog.tick(self.step, "saving a checkpoint")
                    self.save_checkpoint()
                if self.grids.due(self.step):
                    self.watchdog.tick(self.step, "sampling")
                    self.grids.write(self.filled_ema_model, self.out_dir / "samples" / f"step_{self.step:08d}")
                inject_fault("step", self.step, self.runtime.rank)
        finally:
            log.close()
        return 0

    def layout(self) -> dict:
        """What a sharded checkpoint's files depend on: it resumes only into the same."""
        groups, config = self.groups, self.config
        return {"world_size": groups.world_size, "tp": groups.tp_size, "ep": groups.ep_size,
                "zero_stage": config.parallel.zero_stage, "precision": config.train.precision}

    def checkpoint_meta(self, kind: str) -> dict:
        return {"kind": kind, "step": self.step, "run_id": self.run_id, "branched_from": self.branched_from,
                "code_version": code_version(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "layout": self.layout(), "config": self.config.to_dict()}

    def save_checkpoint(self) -> None:
        """A sharded checkpoint of this step, published once complete on every rank (collective)."""
        if self.saved_step == self.step:
            return
        start, root, is_main = time.perf_counter(), self.config.checkpoint_dir, self.runtime.is_main
        path, retention = root / tag_for(self.step), self.config.checkpoint
        last = () if self.saved_step is None else (root / tag_for(self.saved_step),)
        ensure_room(root, path, retention.keep_last, retention.keep_every, last, is_main)
        barrier()
        with reporting_write_errors(path, self.runtime.rank):
            self.engine.save_checkpoint(str(root), tag=path.name, save_latest=False)
            atomic_torch_save({**self.trainer_state(), "rng": capture_rng(), "ema": self.ema.state_dict()},
                              path / rank_state_name(self.runtime.rank))
            barrier()
            inject_fault("save", self.step, self.runtime.rank)
            manifest = publish(path, self.checkpoint_meta(SHARDED))
            if is_main:
                atomic_write_text(root / "latest", path.name + "\n")
        self.saved_step = self.step
        if is_main:
            deleted = prune(root, retention.keep_last, retention.keep_every)
            size = sum(size for size, _ in manifest["files"].values()) / 2**20
            print(f"checkpoint: {path} ({size:.1f} MiB, {time.perf_counter() - start:.1f} s)"
                  + (f"; deleted {', '.join(p.name for p in deleted)}" if deleted else ""), flush=True)

    def resume(self, request: str, allow_change: tuple[str, ...] = ()) -> None:
        """request: "auto" (the newest intact checkpoint under checkpoint_dir, if any), "none" (start
        fresh, setting existing checkpoints aside), or the path of a checkpoint or of a directory of them.
        A checkpoint outside checkpoint_dir starts a branch (run_identity.py)."""
        root, is_main = self.config.checkpoint_dir, self.runtime.is_main
        self.resume_rule = ResumeRule(allow_change, is_main)
        if request == "none":
            if is_main and os.path.lexists(root):
                print(f"warning: starting fresh; the existing checkpoints were moved to {set_aside(root)}", flush=True)
            barrier()
            return
        path = root if request == "auto" else Path(request)
        if request != "auto" and not os.path.lexists(path):
            raise ConfigError(f"--resume {path}: no such checkpoint or directory")
        if is_checkpoint(path):
            manifest, problem = verify(path)
            if problem:
                raise ConfigError(f"--resume {path}: {problem}")
        else:
            found = find_resumable(path, self.layout())
            if found is None:
                if request != "auto":
                    raise ConfigError(f"--resume {path}: no intact checkpoint there")
                return
            path, manifest = found
        self.check_resumable_config(path, manifest)
        if manifest["kind"] == SHARDED:
            self.load_sharded(path)
        else:
            self.load_consolidated(path)
        self.run_id, self.branched_from = resumed_identity(path, manifest, root, self.run_id)
        self.saved_step = self.step
        if is_main:
            source = manifest["run_id"]
            branch = f" as run {self.run_id}, a branch of run {source}" if self.run_id != source else ""
            print(f"resumed from {path} at step {self.step}{branch}", flush=True)

    def check_resumable_config(self, path: Path, manifest: dict) -> None:
        if manifest["kind"] == SHARDED and manifest["layout"] != self.layout():
            raise ConfigError(layout_mismatch(path, manifest["layout"], self.layout()))
        self.resume_rule.check_config(path, manifest, self.config.to_dict(), self.layout())

    def load_sharded(self, path: Path) -> None:
        self.engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        state = torch.load(path / rank_state_name(self.runtime.rank), map_location="cpu", weights_only=False)
        self.ema.load_state_dict(state["ema"])
        restore_rng(state["rng"])
        self.load_trainer_state(state)

    def trainer_state(self) -> dict:
        """The layout-independent position: step, data position, lr schedule, skipped steps."""
        return {"step": self.step, "sampler": self.sampler.state_dict(), "lr_scheduler": self.scheduler.state_dict(),
                **self.health.state_dict()}

    def load_trainer_state(self, state: dict) -> None:
        """See `trainer_state`. The config's optimizer settings win over the checkpoint's (a changed lr
        or warmup applies from here)."""
        self.step = state["step"]
        self.health.load_state_dict(state)
        self.resume_rule.check_data(self.sampler.load_state_dict(state["sampler"]))
        self.scheduler.load_state_dict(state["lr_scheduler"])
        optim = self.config.optim
        self.scheduler.base_lrs = [optim.lr] * len(self.scheduler.base_lrs)
        for group, lr_lambda in zip(self.scheduler.optimizer.param_groups, self.scheduler.lr_lambdas):
            group.update(lr=optim.lr * lr_lambda(self.scheduler.last_epoch), betas=optim.betas,
                         weight_decay=optim.weight_decay)

    @torch.no_grad()
    def load_consolidated(self, path: Path) -> None:
        state = read_consolidated(path)  # memory-mapped: each rank reads its shards' pages only
        load_full_training_state(self.engine, self.model, self.groups, state)
        for name, buffer in persistent_buffers(self.model).items():
            buffer.copy_(state["buffers"][name])
        self.ema.load_full(self.model, state["ema"])
        self.engine.global_steps = state["trainer"]["step"]
        self.load_trainer_state(state["trainer"])

    def metrics_record(self, losses: dict, grad_norm: float, window_steps: int, step_time: float) -> dict:
        c_avg, capacity = capacity_stats(self.model)
        images_per_s = self.config.train.global_batch_size / step_time
        rows_sent = rows_sent_to_other_ranks(self.model)
        a2a_bytes = (rows_sent - self.rows_sent_logged) * self.config.model.hidden_size * self.dtype.itemsize
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
            "all_to_all_mb": a2a_bytes / window_steps / 2**20,  # this rank to the others per step, all passes
            **self.efficiency.record(step_time),
            "phase_s": self.timer.take(),  # of the logging step (the one step timed by phases)
            "skipped_steps": self.health.skipped_steps,
            **self.capacity_by_condition.take(),
        }

    def filled_ema_model(self):
        """A model (fp32, eval) holding the EMA weights of now and the thresholds `sample.thresholds` says
        (collective: the EMA is sharded)."""
        if self.ema_model is None:
            self.ema_model = build_parallel_model(self.config, self.groups, self.runtime.device)
            self.ema_model.float().eval().requires_grad_(False)
        mode = self.config.sample.thresholds
        self.ema.fill(self.ema_model, buffers_to_fill(mode))
        if mode == "calibrate":
            calibrate_thresholds(self.ema_model, self.config, self.groups, self.runtime.device, self.dataset)
        return self.ema_model
