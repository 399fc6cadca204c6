"""What may change when a run resumes, so that a run's training maths cannot drift silently.

Every config key is in one of three classes (`KEY_CLASSES`):
- model-defining: the checkpoint's tensors have its shape or meaning; a change never resumes;
- training maths: what is optimised (objective and noise schedule, data and augmentation, batch,
  seed, token pools and their losses, label dropout, the EMA); a change is refused unless named by
  `--allow-change KEY`;
- operational: how the run gets there (lr schedule, length, parallel layout, numerics, logging,
  checkpoints, sampling); applied from the resumed step on and reported.
Two quantities that no single key holds are training maths as well: `pool_tokens`, the tokens of one
training pool, which the parallel layout sets (under `moe.pool` ep_group or local), and
`dataset_size`, which with the seed fixes every epoch's permutation (the data sampler notices it).
A maths key that the run's FFN kind or objective does not use (`moe.top_k` of a DiffMoE run) is
operational for that run.
"""
import dataclasses
from pathlib import Path

from ..config import Config, ConfigError

DEFINING, MATHS, OPERATIONAL = "model-defining", "training maths", "operational"
POOL_TOKENS, DATASET_SIZE = "pool_tokens", "dataset_size"

# The entry of a key, else that of its section ("model.*"); a key in neither is training maths.
KEY_CLASSES = {
    "model.*": DEFINING,
    "model.class_dropout": MATHS,  # how often the label is dropped: what guidance learns
    "moe.ffn": DEFINING, "moe.num_experts": DEFINING, "moe.interleave": DEFINING, "moe.shared_expert": DEFINING,
    "moe.capacity": MATHS, "moe.pool": MATHS, "moe.predictor_loss_weight": MATHS, "moe.threshold_ema": MATHS,
    "moe.top_k": MATHS, "moe.capacity_factor": MATHS, "moe.balance_loss_weight": MATHS,
    "moe.inference_routing": OPERATIONAL,  # sampling only
    "diffusion.*": MATHS,
    "diffusion.objective": DEFINING,  # what the output means
    "data.dataset": MATHS, "data.hflip": MATHS,
    "data.path": OPERATIONAL,  # data moved; other data of another size shows as dataset_size
    "data.vae": OPERATIONAL,  # decodes the sample grids only
    "train.global_batch_size": MATHS, "train.grad_accum_steps": MATHS, "train.seed": MATHS,
    "train.ema_decay": MATHS,
    "train.*": OPERATIONAL,  # max_steps, out_dir, precision, tf32, deterministic, max_nonfinite_steps
    "optim.*": OPERATIONAL, "sample.*": OPERATIONAL, "parallel.*": OPERATIONAL, "logging.*": OPERATIONAL,
    "checkpoint.*": OPERATIONAL,
}

# Keys used by one FFN kind or objective only: (the key that decides, the values that use it).
_USED_ONLY_WITH = {
    **{key: ("moe.ffn", ("diffmoe", "expert_choice")) for key in ("moe.capacity", "moe.pool")},
    **{key: ("moe.ffn", ("diffmoe",)) for key in ("moe.predictor_loss_weight", "moe.threshold_ema")},
    **{key: ("moe.ffn", ("token_choice",)) for key in ("moe.top_k", "moe.capacity_factor", "moe.balance_loss_weight")},
    **{key: ("diffusion.objective", ("ddpm",)) for key in ("diffusion.num_timesteps", "diffusion.beta_start",
                                                           "diffusion.beta_end")},
}

# The data sampler's state -> the name a change of it goes by here.
_SAMPLER_NAMES = {"seed": "train.seed", "global_batch_size": "train.global_batch_size", "dataset_size": DATASET_SIZE}


def flatten(config: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def config_keys() -> list[str]:
    """Every key of the config schema, as section.key."""
    defaults = Config()
    return [f"{section.name}.{key.name}" for section in dataclasses.fields(defaults)
            for key in dataclasses.fields(getattr(defaults, section.name))]


def key_class(key: str) -> str:
    return KEY_CLASSES.get(key) or KEY_CLASSES.get(key.split(".")[0] + ".*", MATHS)


def allowable_changes() -> list[str]:
    """The names `--allow-change` takes: the training-maths keys and the two derived quantities."""
    return [key for key in config_keys() if key_class(key) == MATHS] + [POOL_TOKENS, DATASET_SIZE]


def check_allowable(names: list[str]) -> None:
    """A ConfigError naming the first of `names` that is no refused change."""
    known = allowable_changes()
    for name in names:
        if name not in known:
            raise ConfigError(f"--allow-change {name}: not a change that a resume refuses; the names are "
                              f"{', '.join(known)}")


def pool_tokens(config: dict, layout: dict) -> int | None:
    """Tokens of one training pool (those among which each expert takes its top-C, or whose count sets
    token choice's capacity limit) for a config (as `Config.to_dict` gives it) on a parallel layout
    (world_size, tp, ep); None where there is none (dense FFNs, token choice without a limit)."""
    model, moe, train = config["model"], config["moe"], config["train"]
    per_image = (model["input_size"] // model["patch_size"]) ** 2
    data_parallel = layout["world_size"] // layout["tp"]
    micro_batch = train["global_batch_size"] // (data_parallel * train["grad_accum_steps"])
    if moe["ffn"] == "dense" or (moe["ffn"] == "token_choice" and not moe["capacity_factor"] > 0):
        return None
    if moe["ffn"] == "token_choice" or moe["pool"] == "local":
        return micro_batch * per_image
    if moe["pool"] == "sample":
        return per_image
    return layout["ep"] * micro_batch * per_image


def describe_pool(config: dict, layout: dict) -> str:
    """The run header's words for the training pool."""
    tokens = pool_tokens(config, layout)
    if tokens is None:
        return "no token pool"
    per_image = (config["model"]["input_size"] // config["model"]["patch_size"]) ** 2
    return f"token pool {tokens} tokens ({config['moe']['pool']}: {tokens // per_image} images x {per_image} tokens)"


def _used(key: str, config: dict) -> bool:
    decider, values = _USED_ONLY_WITH.get(key, (None, None))
    return decider is None or flatten(config).get(decider) in values


@dataclasses.dataclass
class Changes:
    """Each list holds "key: old -> new"."""
    defining: list[str] = dataclasses.field(default_factory=list)  # never resumes
    refused: list[str] = dataclasses.field(default_factory=list)  # training maths not allowed
    allowed: list[str] = dataclasses.field(default_factory=list)  # training maths allowed by --allow-change
    operational: list[str] = dataclasses.field(default_factory=list)  # applied


def classify_changes(saved: dict, current: dict, allow: set[str], derived: dict[str, tuple] = ()) -> Changes:
    """The differences between a checkpoint's config and this run's, by class; `derived` adds the
    changed derived quantities, {name: (old, new)}. Keys the current schema no longer has are ignored."""
    old, new = flatten(saved), flatten(current)
    changes = Changes()
    differing = {key: (old.get(key), new[key]) for key in sorted(new) if old.get(key) != new[key]}
    for key, (before, after) in {**differing, **dict(derived)}.items():
        kind = key_class(key) if key in new else MATHS
        if kind == MATHS and key in new and not _used(key, current):
            kind = OPERATIONAL
        bucket = {DEFINING: changes.defining, OPERATIONAL: changes.operational}.get(kind)
        if bucket is None:
            bucket = changes.allowed if key in allow else changes.refused
        bucket.append(f"{key}: {before!r} -> {after!r}")
    return changes


class ResumeRule:
    """Checks a resume against its checkpoint: `check_config` before loading it, `check_data` with what the
    data sampler found when restored. Refusals are ConfigErrors (exit 2); the main rank prints what changes."""

    def __init__(self, allow_change: list[str] | tuple = (), is_main: bool = True):
        self.allow = set(allow_change)
        self.is_main = is_main
        self.checkpoint = None
        self.reported = set()  # names whose change has been judged already

    def check_config(self, checkpoint: Path, manifest: dict, config: dict, layout: dict) -> None:
        self.checkpoint = checkpoint
        saved_pool, pool = pool_tokens(manifest["config"], manifest["layout"]), pool_tokens(config, layout)
        derived = {POOL_TOKENS: (saved_pool, pool)} if saved_pool != pool else {}
        changes = classify_changes(manifest["config"], config, self.allow, derived)
        if changes.defining:
            raise ConfigError(f"checkpoint {checkpoint} holds another model; it cannot continue with "
                              f"{'; '.join(changes.defining)} (start a new run directory, or --no-resume)")
        self._judge(changes, "was trained with other training maths")
        if changes.operational and self.is_main:
            print(f"resuming with a changed config: {'; '.join(changes.operational)}", flush=True)
        self.reported |= {change.split(":")[0] for change in changes.allowed + changes.refused}

    def check_data(self, differences: dict[str, tuple]) -> None:
        """differences: {sampler state name: (saved, now)}, as `ShuffledBatchSampler.load_state_dict` returns."""
        named = {_SAMPLER_NAMES[name]: values for name, values in differences.items()}
        changes = Changes()
        for name, (before, after) in named.items():
            if name not in self.reported:
                (changes.allowed if name in self.allow else changes.refused).append(f"{name}: {before!r} -> {after!r}")
        self._judge(changes, "drew its batches from other data")

    def _judge(self, changes: Changes, what: str) -> None:
        if changes.refused:
            names = [change.split(":")[0] for change in changes.refused]
            raise ConfigError(f"checkpoint {self.checkpoint} {what}: {'; '.join(changes.refused)}. Resume with its "
                              f"values, or accept the change with {' '.join('--allow-change ' + n for n in names)}")
        if changes.allowed and self.is_main:
            print(f"resuming with changed training maths, allowed by --allow-change: {'; '.join(changes.allowed)}",
                  flush=True)
