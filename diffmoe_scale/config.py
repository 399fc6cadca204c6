"""Typed run configuration: YAML files -> dataclasses, validated before any work starts.

A YAML file may name a `base:` file (path relative to itself) whose values it overrides.
Every error names the file and the dotted key at fault.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

# DiT sizes (depth, hidden size, heads) from Peebles & Xie, "Scalable Diffusion Models with Transformers".
MODEL_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    size: Optional[Literal["S", "B", "L", "XL"]] = None  # fills depth/hidden_size/num_heads left unset
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    patch_size: int = 2
    input_size: int = 32  # latent height = width
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout: float = 0.1
    learn_sigma: bool = True

    @property
    def ffn_width(self) -> int:
        """Hidden width of the dense FFN and of each expert."""
        return int(self.hidden_size * self.mlp_ratio)


@dataclass
class MoEConfig:
    ffn: Literal["dense", "token_choice", "expert_choice", "diffmoe"] = "diffmoe"
    num_experts: int = 8
    interleave: bool = True  # MoE in blocks 1, 3, 5, ...; dense elsewhere
    capacity: float = 1.0  # expert_choice / diffmoe: tokens per expert = int(pool / E * capacity)
    # Pool of the top-C choice: "ep_group" = the expert-parallel group's batch (one rank: its batch),
    # "local" = each rank's batch (the authors' DDP code), "sample" = each sample (expert_choice).
    pool: Optional[Literal["ep_group", "local", "sample"]] = None  # default: sample for expert_choice, else ep_group
    shared_expert: bool = False
    predictor_loss_weight: float = 1.0
    threshold_ema: float = 0.95
    inference_routing: Literal["threshold", "batch_independent", "capacity"] = "threshold"
    top_k: int = 2  # token_choice
    capacity_factor: float = 0.0  # token_choice; 0 = no capacity limit (no dropped tokens)
    balance_loss_weight: float = 0.01  # token_choice


@dataclass
class DiffusionConfig:
    objective: Literal["flow", "ddpm"] = "flow"
    num_timesteps: int = 1000  # ddpm
    beta_start: float = 1e-4  # ddpm, linear schedule
    beta_end: float = 0.02


@dataclass
class SampleConfig:
    sampler: Optional[Literal["euler", "heun", "ancestral", "ddim"]] = None  # default: euler / ancestral
    steps: int = 50
    cfg_scale: float = 1.5
    per_class: int = 8  # grids (end of run, sample.every_steps): samples per class, one row per class
    grid_classes: int = 10  # classes in a grid, spread evenly over the labels (all when there are fewer)
    every_steps: int = 0  # a grid from the EMA weights every this many steps during training; 0 = off
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # launch/sample.py: auto = bf16 where the device has it
    seed: int = 0
    thresholds: Literal["copy", "average", "calibrate"] = "average"  # DiffMoE thresholds of the EMA model
    calibration_batches: int = 16  # thresholds: calibrate


@dataclass
class DataConfig:
    dataset: Literal["digits", "latents"] = "digits"
    path: Optional[str] = None  # latents: directory of latent shards and their index
    vae: Optional[str] = None  # latents: local AutoencoderKL directory that decodes the sample grids
    hflip: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 = off


@dataclass
class TrainConfig:
    global_batch_size: int = 256
    grad_accum_steps: int = 1  # micro-batches per optimizer step and rank; each is its own token pool
    max_steps: int = 1000
    out_dir: str = "runs/default"
    seed: int = 0
    ema_decay: float = 0.9999
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    tf32: bool = True  # TF32 for the matmuls that stay fp32, on GPUs that have it (false: exact fp32)
    deterministic: bool = False  # bit-exact GPU runs: deterministic kernels, math attention (slower)
    compile: bool = False  # torch.compile each DiT block (parallel/compile.py), for training and sampling
    max_nonfinite_steps: int = 5  # NaN/Inf steps in a row (each skipped) before the run saves and stops
    # Dense peak TFLOP/s of one device in the training precision, for the MFU in the logs; default: from
    # the GPU's name (H100, H200, A100, B200; train/efficiency.py), none on a CPU.
    peak_tflops: Optional[float] = None


@dataclass
class ParallelConfig:
    ep: int = 1  # expert-parallel size: ranks sharing a token pool and splitting the experts
    tp: int = 1  # tensor-parallel size (megatron-core column/row parallel linears)
    zero_stage: int = 0
    # DeepSpeed ZeRO 1/2: reduce gradient buckets while the backward runs (two reduce buckets then), and the
    # bucket sizes in elements (DeepSpeed's default 5e8: 2 GB per fp32 bucket); the estimator counts them.
    overlap_comm: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    activation_checkpointing: bool = False  # recompute blocks in backward instead of keeping activations
    activation_checkpointing_every: int = 1  # checkpoint blocks 0, n, 2n, ...
    # Every process group's timeout: a collective that waits longer ends the job (a peer stalled or died).
    timeout_minutes: float = 10.0
    # A rank that makes no progress (no step boundary) for this long says so, once per stall.
    stall_warning_minutes: float = 2.0


@dataclass
class LoggingConfig:
    every_steps: int = 10
    wandb: bool = False  # also log to Weights & Biases (rank 0); the run id survives resumes
    wandb_project: str = "diffmoe_scale"
    wandb_entity: Optional[str] = None
    wandb_mode: Literal["offline", "online"] = "offline"  # offline needs no network: `wandb sync` later


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # 0 = only at the end of the run and when stopped or preempted
    keep_last: int = 3  # complete checkpoints kept besides those kept by keep_every
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0 = none
    dir: Optional[str] = None  # default: <train.out_dir>/checkpoints


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.train.out_dir) / "checkpoints")

    def to_dict(self) -> dict:
        """Plain YAML/JSON types only (tuples as lists)."""
        data = dataclasses.asdict(self)
        data["optim"]["betas"] = list(data["optim"]["betas"])
        return data


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read `path` (following `base:` links), apply `section.key=value` overrides, validate."""
    path = Path(path)
    raw = _read_yaml_with_bases(path, seen=())
    for override in overrides:
        _apply_override(raw, override, source=str(path))
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict, source: str) -> Config:
    """A validated Config from nested mappings (a YAML file's, or one saved in a checkpoint)."""
    config = _build(Config, raw, source=source, prefix="")
    _resolve_and_validate(config, source=source)
    return config


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...], named_by: Path | None = None) -> dict:
    if not path.is_file():
        raise ConfigError(f"{named_by}: base file {path} not found" if named_by else f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' links form a cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a file path, got {base!r}")
    merged = _read_yaml_with_bases(path.parent / base, seen + (path.resolve(),), named_by=path)
    _deep_update(merged, raw)
    return merged


def _deep_update(target: dict, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _apply_override(raw: dict, override: str, source: str) -> None:
    key, sep, value_text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"{source}: --set {override!r}: expected section.key=value")
    section, name = parts
    if not isinstance(raw.setdefault(section, {}), dict):
        raise ConfigError(f"{source}: --set {override!r}: section {section!r} is not a mapping")
    try:
        raw[section][name] = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: --set {override!r}: value is not valid YAML: {err}") from None


def _build(cls, raw, source: str, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, source, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, source, f"{prefix}{name}")
    return cls(**values)


def _coerce(value, hint, source: str, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, source, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: {key} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# Cross-field resolution and validation


def _resolve_and_validate(config: Config, source: str) -> None:
    def fail(key: str, message: str):
        raise ConfigError(f"{source}: {key}: {message}")

    def require(condition: bool, key: str, message: str):
        if not condition:
            fail(key, message)

    model, moe, parallel = config.model, config.moe, config.parallel
    require(parallel.ep >= 1, "parallel.ep", "must be at least 1")
    require(parallel.tp >= 1, "parallel.tp", "must be at least 1")
    if model.size is not None:
        depth, hidden, heads = MODEL_SIZES[model.size]
        model.depth = depth if model.depth is None else model.depth
        model.hidden_size = hidden if model.hidden_size is None else model.hidden_size
        model.num_heads = heads if model.num_heads is None else model.num_heads
    for key in ("depth", "hidden_size", "num_heads"):
        require(getattr(model, key) is not None, f"model.{key}", "not set (give it, or model.size)")
    for key in ("depth", "hidden_size", "num_heads", "input_size", "in_channels", "num_classes"):
        require(getattr(model, key) > 0, f"model.{key}", "must be positive")
    require(model.hidden_size % 4 == 0, "model.hidden_size", "must be a multiple of 4 (2-D sin-cos position embedding)")
    require(model.hidden_size % model.num_heads == 0, "model.num_heads",
            f"must divide model.hidden_size={model.hidden_size}")
    require(model.patch_size > 0 and model.input_size % model.patch_size == 0, "model.patch_size",
            f"must divide model.input_size={model.input_size}")
    require(0.0 <= model.class_dropout < 1.0, "model.class_dropout", "must be in [0, 1)")
    require(model.mlp_ratio > 0, "model.mlp_ratio", "must be positive")
    require(model.num_heads % parallel.tp == 0, "parallel.tp",
            f"must divide model.num_heads={model.num_heads} (each rank takes whole heads)")
    require(model.ffn_width % parallel.tp == 0, "parallel.tp", f"must divide the FFN width {model.ffn_width}")

    if moe.pool is None:
        moe.pool = "sample" if moe.ffn == "expert_choice" else "ep_group"
    if moe.ffn != "dense":
        require(moe.num_experts >= 1, "moe.num_experts", "must be at least 1")
        require(moe.num_experts % parallel.ep == 0, "moe.num_experts",
                f"{moe.num_experts} experts cannot be split evenly over parallel.ep={parallel.ep}")
    require(0 < moe.capacity < float("inf"), "moe.capacity", "must be positive and finite")
    require(0.0 <= moe.threshold_ema < 1.0, "moe.threshold_ema", "must be in [0, 1)")
    require(moe.predictor_loss_weight >= 0, "moe.predictor_loss_weight", "must be >= 0")
    if moe.ffn == "expert_choice":
        require(moe.pool == "sample", "moe.pool", "expert_choice routes within each sample: pool must be 'sample'")
    if moe.ffn == "diffmoe":
        require(moe.pool != "sample", "moe.pool", "a per-sample pool is the expert_choice baseline (moe.ffn)")
    if moe.ffn == "token_choice":
        require(1 <= moe.top_k <= moe.num_experts, "moe.top_k", f"must be in [1, moe.num_experts={moe.num_experts}]")
        require(moe.capacity_factor >= 0, "moe.capacity_factor", "must be >= 0 (0 = unlimited)")
        require(parallel.ep == 1, "parallel.ep", "the token_choice baseline runs without expert parallelism: use 1")

    diffusion, sample = config.diffusion, config.sample
    if sample.sampler is None:
        sample.sampler = "euler" if diffusion.objective == "flow" else "ancestral"
    allowed = ("euler", "heun") if diffusion.objective == "flow" else ("ancestral", "ddim")
    require(sample.sampler in allowed, "sample.sampler",
            f"{sample.sampler!r} does not fit diffusion.objective={diffusion.objective!r} (use one of {list(allowed)})")
    require(sample.steps >= 1, "sample.steps", "must be at least 1")
    require(sample.per_class >= 1, "sample.per_class", "must be at least 1")
    require(sample.grid_classes >= 1, "sample.grid_classes", "must be at least 1")
    require(sample.every_steps >= 0, "sample.every_steps", "must be 0 (off) or positive")
    require(sample.calibration_batches >= 1, "sample.calibration_batches", "must be at least 1")
    if diffusion.objective == "ddpm":
        require(diffusion.num_timesteps >= 2, "diffusion.num_timesteps", "must be at least 2")
        require(sample.steps <= diffusion.num_timesteps, "sample.steps",
                f"cannot exceed diffusion.num_timesteps={diffusion.num_timesteps}")
        require(0 < diffusion.beta_start < diffusion.beta_end < 1, "diffusion.beta_start",
                "need 0 < beta_start < beta_end < 1")

    train, optim = config.train, config.optim
    require(train.max_steps >= 1, "train.max_steps", "must be at least 1")
    require(train.global_batch_size >= 1, "train.global_batch_size", "must be at least 1")
    require(train.grad_accum_steps >= 1, "train.grad_accum_steps", "must be at least 1")
    require(train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be at least 1")
    require(0.0 <= train.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
    require(optim.lr > 0, "optim.lr", "must be positive")
    require(all(0 <= b < 1 for b in optim.betas), "optim.betas", "each must be in [0, 1)")
    require(optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    require(optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
    require(config.logging.every_steps >= 1, "logging.every_steps", "must be at least 1")
    checkpoint = config.checkpoint
    require(checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0 = only at the end and on stop)")
    require(checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be at least 1")
    require(checkpoint.keep_every >= 0, "checkpoint.keep_every", "must be >= 0 (0 = none)")
    require(parallel.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", "must be 0, 1, 2 or 3")
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        require(getattr(parallel, key) >= 1_000_000, f"parallel.{key}",
                f"must be at least 1000000 elements (got {getattr(parallel, key)}): smaller buckets make many "
                f"small collectives")
    require(train.peak_tflops is None or 0 < train.peak_tflops < float("inf"), "train.peak_tflops",
            "must be positive and finite (or unset: from the GPU's name)")
    require(parallel.activation_checkpointing_every >= 1, "parallel.activation_checkpointing_every",
            "must be at least 1")
    require(0 < parallel.timeout_minutes < float("inf"), "parallel.timeout_minutes", "must be positive and finite")
    require(0 < parallel.stall_warning_minutes < parallel.timeout_minutes, "parallel.stall_warning_minutes",
            f"must be positive and shorter than parallel.timeout_minutes={parallel.timeout_minutes}")
    if train.compile:
        require(parallel.tp == 1, "train.compile", "compiled blocks are not supported with tensor parallelism "
                "(parallel.tp > 1): use one or the other")
    if parallel.zero_stage == 3 and moe.ffn != "dense":
        fail("parallel.zero_stage", "ZeRO-3 does not support MoE layers; use stage 0, 1 or 2")
    if train.precision != "fp32":
        require(parallel.zero_stage in (1, 2), "parallel.zero_stage",
                f"train.precision={train.precision} keeps fp32 master weights and accumulates and reduces gradients "
                f"in fp32 through DeepSpeed's ZeRO optimizers: use stage 1 or 2 (with one data-parallel rank, "
                f"stage 1 costs what stage 0 does)")
    if config.data.dataset == "latents":
        require(config.data.path is not None, "data.path", "the latents dataset needs the directory of its shards")
    if config.data.dataset == "digits":
        require(model.input_size == 8 and model.in_channels == 1, "model.input_size",
                "the digits dataset is 8x8 with 1 channel: set model.input_size=8, model.in_channels=1")
        require(model.num_classes == 10, "model.num_classes", "the digits dataset has 10 classes")


def dump_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
