"""Config files and the config loader: every shipped YAML loads and builds, the ImageNet files say
what their names say (paper settings), Dense-DiT sizes match the published DiT parameter counts,
and bad configs fail early with a message naming the file and the key."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from diffmoe_scale.config import MODEL_SIZES, Config, ConfigError, dump_config, load_config
from diffmoe_scale.models import build_model, is_moe_block

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
IMAGENET_DIR = CONFIG_DIR / "imagenet"
DIGITS_CONFIG = CONFIG_DIR / "digits_diffmoe_e4_flow.yaml"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable

ALL_CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if not p.name.startswith("_"))


def config_id(path: Path) -> str:
    return str(path.relative_to(CONFIG_DIR))


def is_imagenet(path: Path) -> bool:
    return IMAGENET_DIR in path.parents


# ----------------------------------------------------------------------------------------------
# Every shipped config loads and builds


def test_config_files_found():
    names = {config_id(p) for p in ALL_CONFIGS}
    assert {
        "digits_diffmoe_e4_flow.yaml", "digits_diffmoe_e4_ddpm.yaml", "digits_dense_flow.yaml",
        "digits_token_choice_e4_flow.yaml", "digits_expert_choice_e4_flow.yaml",
    } <= names
    assert len([n for n in names if n.startswith("imagenet/")]) == len(EXPECTED_IMAGENET) + len(AUTHORS_RELEASES)


@pytest.fixture
def one_thread():
    """Tiny CPU forwards: one thread avoids OpenMP spin-waits on busy shared cores (10 ms per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=config_id)
def test_config_loads_and_builds(path, one_thread):
    config = load_config(path)
    if is_imagenet(path):
        with torch.device("meta"):  # L/XL would take seconds and GBs to initialise for real
            model = build_model(config)
        assert model.pos_embed.is_meta
    else:
        torch.manual_seed(0)
        model = build_model(config)
        batch = 4
        x = torch.randn(batch, config.model.in_channels, config.model.input_size, config.model.input_size)
        y = torch.randint(0, config.model.num_classes, (batch,))
        out, losses = model(x, torch.rand(batch), y)
        channels = config.model.in_channels * (2 if config.model.learn_sigma else 1)
        assert out.shape == (batch, channels, config.model.input_size, config.model.input_size)
        assert torch.isfinite(out).all()
        expected_loss = {"dense": set(), "expert_choice": set(), "diffmoe": {"predictor"},
                         "token_choice": {"balance"}}[config.moe.ffn]
        assert set(losses) == expected_loss
    assert len(model.blocks) == config.model.depth
    num_moe = sum(is_moe_block(config, i) for i in range(config.model.depth))
    assert len(model.moe_layers()) == num_moe
    assert num_moe == (0 if config.moe.ffn == "dense" else config.model.depth // 2)  # interleaved everywhere
    for layer in model.moe_layers():
        assert layer.num_experts == config.moe.num_experts
    assert config.train.out_dir == f"runs/{path.stem}"


# ----------------------------------------------------------------------------------------------
# ImageNet files: the name says the variant, the rest is the paper's setting

# DiT (Peebles & Xie), Table 1: depth, hidden size, heads. The authors' DiffMoE-S config uses 16 heads;
# our S files keep DiT's 6 (a comment in each says so).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
EXPECTED_IMAGENET = {}  # file stem -> (size, ffn, num_experts or None, objective)
for _objective in ("flow", "ddpm"):
    for _size in ("S", "B", "L"):
        for _e in (4, 8, 16):
            EXPECTED_IMAGENET[f"diffmoe_{_size.lower()}_e{_e}_{_objective}"] = (_size, "diffmoe", _e, _objective)
    for _size in ("S", "B", "L", "XL"):
        EXPECTED_IMAGENET[f"dense_{_size.lower()}_{_objective}"] = (_size, "dense", None, _objective)
EXPECTED_IMAGENET["token_choice_l_e16_flow"] = ("L", "token_choice", 16, "flow")
EXPECTED_IMAGENET["expert_choice_l_e16_flow"] = ("L", "expert_choice", 16, "flow")


@pytest.mark.parametrize("stem", sorted(EXPECTED_IMAGENET))
def test_imagenet_config_matches_name_and_paper(stem):
    path = IMAGENET_DIR / f"{stem}.yaml"
    assert path.is_file(), f"missing {path}"
    config = load_config(path)
    size, ffn, num_experts, objective = EXPECTED_IMAGENET[stem]
    model, moe = config.model, config.moe
    # The variant named by the file.
    assert model.size == size
    assert (model.depth, model.hidden_size, model.num_heads) == DIT_SIZES[size] == MODEL_SIZES[size]
    assert moe.ffn == ffn
    if num_experts is not None:
        assert moe.num_experts == num_experts
    assert config.diffusion.objective == objective
    assert config.sample.sampler == ("euler" if objective == "flow" else "ancestral")
    assert config.train.max_steps == (7_000_000 if stem.startswith("diffmoe_l_e8_") else 700_000)
    assert config.train.out_dir == f"runs/{stem}"
    if ffn == "token_choice":
        assert (moe.top_k, moe.balance_loss_weight, moe.capacity_factor) == (2, 0.01, 0.0)
    if ffn == "expert_choice":
        assert moe.pool == "sample"
    if ffn == "diffmoe":
        assert (moe.pool, moe.predictor_loss_weight, moe.threshold_ema) == ("ep_group", 1.0, 0.95)
    # The paper's shared setting (ImageNet 256 -> 32x32x4 SD-VAE latents).
    assert (model.input_size, model.in_channels, model.patch_size, model.mlp_ratio) == (32, 4, 2, 4.0)
    assert (model.num_classes, model.class_dropout, model.learn_sigma) == (1000, 0.1, True)
    assert (moe.interleave, moe.capacity, moe.shared_expert) == (True, 1.0, False)
    assert config.data.dataset == "latents" and config.data.hflip
    optim = config.optim
    assert (optim.lr, optim.betas, optim.weight_decay, optim.warmup_steps, optim.grad_clip) == (
        1e-4, (0.9, 0.999), 0.0, 0, 0.0)
    assert (config.train.global_batch_size, config.train.ema_decay) == (256, 0.9999)
    assert (config.sample.steps, config.sample.cfg_scale) == (250, 1.0)
    assert config.diffusion.num_timesteps == 1000
    # The L-E8 runs carry the slurm/l_e8_7m recipes' layout; the others leave EP and TP to the launch.
    # All train as production trainers do: bf16 matmuls, TF32 for what stays fp32, fp32 masters in ZeRO 1.
    assert (config.parallel.ep, config.parallel.tp) == ((8, 1) if stem.startswith("diffmoe_l_e8_") else (1, 1))
    assert (config.train.precision, config.train.tf32, config.parallel.zero_stage) == ("bf16", True, 1)
    assert (config.checkpoint.every_steps, config.checkpoint.keep_last, config.checkpoint.keep_every) == (
        10_000, 3, 500_000)


# ----------------------------------------------------------------------------------------------
# The authors' released run, beside ours

# KwaiVGI/DiffMoE at commit 3b7146d (config/000_DiffMoE_S_E16_Flow.yaml and the code that reads it), read
# by hand: what each of our keys must be for their S-E16-Flow run.
AUTHORS_S_E16_FLOW = {
    "model.depth": 12, "model.hidden_size": 384, "model.num_heads": 16, "model.mlp_ratio": 4.0, "model.patch_size": 2,
    "model.input_size": 16, "model.in_channels": 4, "model.num_classes": 1000, "model.class_dropout": 0.1,
    "model.learn_sigma": True,
    "moe.ffn": "diffmoe", "moe.num_experts": 16, "moe.interleave": True, "moe.capacity": 1.0, "moe.shared_expert": False,
    "moe.predictor_loss_weight": 1.0, "moe.threshold_ema": 0.95, "moe.pool": "local",
    "moe.inference_routing": "threshold",
    "diffusion.objective": "flow", "sample.sampler": "euler", "sample.steps": 250, "sample.cfg_scale": 1.0,
    "sample.thresholds": "average",
    "data.dataset": "latents", "data.hflip": True,
    "optim.lr": 1e-4, "optim.betas": [0.9, 0.999], "optim.weight_decay": 0.0, "optim.warmup_steps": 0,
    "optim.grad_clip": 0.0,
    "train.global_batch_size": 512, "train.grad_accum_steps": 1, "train.max_steps": 1000 * (1_281_167 // 512),
    "train.seed": 1234, "train.ema_decay": 0.9999, "train.precision": "fp32", "train.tf32": True,
    "parallel.ep": 1, "parallel.tp": 1, "parallel.zero_stage": 0,
    "logging.every_steps": 100, "checkpoint.every_steps": 50_000, "checkpoint.keep_every": 50_000,
}
AUTHORS_RELEASES = {"diffmoe_s_e16_flow_authors": ("diffmoe_s_e16_flow", AUTHORS_S_E16_FLOW)}


@pytest.mark.parametrize("stem", sorted(AUTHORS_RELEASES))
def test_the_authors_release_is_reproduced_key_by_key(stem):
    from diffmoe_scale.train.resume_policy import flatten, pool_tokens

    ours_stem, theirs = AUTHORS_RELEASES[stem]
    path = IMAGENET_DIR / f"{stem}.yaml"
    config = load_config(path)
    values = flatten(config.to_dict())
    wrong = {key: (values[key], value) for key, value in theirs.items() if values[key] != value}
    assert not wrong, f"{path.name}: key: (ours, the authors') {wrong}"
    # Every value says where it comes from (a comment on its line), the run directory aside.
    lines = [line for line in path.read_text().splitlines() if re.match(r"\s+\w+:\s*\S", line)]
    bare = [line for line in lines if "#" not in line and "out_dir" not in line]
    assert not bare, bare
    # Their pool is each GPU's batch: 128 images of 64 tokens on the 4 GPUs of their README, 512 on train.sh's one.
    layout = {"world_size": 4, "tp": 1, "ep": 1}
    assert pool_tokens(config.to_dict(), layout) == 128 * 64
    assert pool_tokens(config.to_dict(), {**layout, "world_size": 1}) == 512 * 64
    # Beside our S-E16-Flow, it differs in what their run does differently, and in nothing else.
    ours = flatten(load_config(IMAGENET_DIR / f"{ours_stem}.yaml").to_dict())
    assert {key for key in values if values[key] != ours[key]} == {
        "model.size", "model.num_heads", "model.input_size", "moe.pool", "data.path", "train.global_batch_size",
        "train.max_steps", "train.out_dir", "train.seed", "train.precision", "parallel.zero_stage",
        "checkpoint.every_steps", "checkpoint.keep_every"}


# ----------------------------------------------------------------------------------------------
# Dense-DiT parameter counts = DiT's


def dit_param_count(depth, dim, patch=2, in_channels=4, num_classes=1000, input_size=32, frequency_dim=256):
    """DiT's parameter count written out by hand (learned sigma; pos_embed included, as DiT counts it)."""
    out_channels = 2 * in_channels
    x_embedder = in_channels * patch * patch * dim + dim
    t_embedder = frequency_dim * dim + dim + dim * dim + dim
    y_embedder = (num_classes + 1) * dim  # + the null class for classifier-free guidance
    attention = dim * 3 * dim + 3 * dim + dim * dim + dim
    mlp = dim * 4 * dim + 4 * dim + 4 * dim * dim + dim
    block_adaln = dim * 6 * dim + 6 * dim
    final = dim * patch * patch * out_channels + patch * patch * out_channels + dim * 2 * dim + 2 * dim
    pos_embed = (input_size // patch) ** 2 * dim
    return x_embedder + t_embedder + y_embedder + depth * (attention + mlp + block_adaln) + final + pos_embed


def dense_counts(size):
    config = load_config(IMAGENET_DIR / f"dense_{size.lower()}_flow.yaml")
    with torch.device("meta"):
        model = build_model(config)
    trainable = sum(p.numel() for p in model.parameters())
    return trainable, model.pos_embed.numel(), config


@pytest.mark.parametrize("size,table4_millions", [("S", 33), ("B", 130), ("L", 458), ("XL", 675)])
def test_dense_dit_parameter_counts(size, table4_millions):
    trainable, pos_embed, config = dense_counts(size)
    # DiT stores pos_embed as a frozen nn.Parameter, so its printed count includes it; ours is a buffer.
    total = trainable + pos_embed
    assert total == dit_param_count(config.model.depth, config.model.hidden_size)
    if size == "XL":
        assert total == 675_129_632  # "DiT Parameters: 675,129,632" printed by DiT's train.py for DiT-XL/2
    # DiT paper, Table 4 (Gflops / params). Its rounded figures match the *trainable* count: with the
    # frozen pos_embed, B/2 is 130,512,416 = 131M to the nearest million, Table 4 says 130M.
    assert round(trainable / 1e6) == table4_millions


# ----------------------------------------------------------------------------------------------
# Overrides and dump/reload


def test_overrides_apply():
    base = load_config(DIGITS_CONFIG)
    config = load_config(DIGITS_CONFIG, [
        "train.max_steps=7",
        "train.max_steps=9",  # the last one wins
        "moe.num_experts=8",
        "optim.betas=[0.8, 0.95]",
        "optim.lr=0.5",
        "sample.sampler=heun",
        "parallel.ep=2",  # a section the file does not have
        "moe.pool=",  # empty value = null -> resolved default
        "train.out_dir=runs/x y",
    ])
    assert config.train.max_steps == 9
    assert config.moe.num_experts == 8
    assert config.optim.betas == (0.8, 0.95)
    assert config.optim.lr == 0.5 and isinstance(config.optim.lr, float)
    assert config.sample.sampler == "heun"
    assert config.parallel.ep == 2
    assert config.moe.pool == "ep_group"
    assert config.train.out_dir == "runs/x y"
    # nothing else changed
    config.train.max_steps, config.moe.num_experts, config.optim.betas = base.train.max_steps, 4, base.optim.betas
    config.optim.lr, config.sample.sampler, config.parallel.ep = base.optim.lr, "euler", 1
    config.train.out_dir = base.train.out_dir
    assert config == base


def test_override_applies_over_base_chain():
    config = load_config(IMAGENET_DIR / "diffmoe_l_e8_flow.yaml", ["train.max_steps=7", "model.num_heads=8"])
    assert config.train.max_steps == 7
    assert (config.model.depth, config.model.hidden_size, config.model.num_heads) == (24, 1024, 8)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=config_id)
def test_dump_config_reloads_equal(path, tmp_path):
    config = load_config(path)
    dumped = tmp_path / "config.yaml"
    dump_config(config, dumped)
    assert "base" not in yaml.safe_load(dumped.read_text())
    reloaded = load_config(dumped)
    assert isinstance(reloaded, Config)
    assert reloaded == config


# ----------------------------------------------------------------------------------------------
# Bad configs: ConfigError naming the file and the key

DIGITS_BASE = f"base: {DIGITS_CONFIG}\n"  # an absolute base: the bad file differs from a good config in one place
IMAGENET_BASE = f"base: {IMAGENET_DIR / 'diffmoe_l_e8_flow.yaml'}\n"


def case(id, text, fragment, overrides=(), files=None, named="bad.yaml", marks=(), names_file_marks=()):
    """text: bad.yaml's content (None: not written); files: other files in the same folder;
    named: the file the message must name (relative to tmp_path)."""
    return dict(id=id, text=text, fragment=fragment, overrides=list(overrides), files=files or {}, named=named,
                marks=marks, names_file_marks=names_file_marks)


BAD_CASES = [
    # structure
    case("unknown-section", DIGITS_BASE + "extra:\n  a: 1\n", "unknown key extra"),
    case("unknown-key", DIGITS_BASE + "moe:\n  num_expert: 4\n", "unknown key moe.num_expert"),
    case("section-not-mapping", DIGITS_BASE + "model: 5\n", "model: expected a mapping, got 5"),
    case("top-level-list", "- model\n- moe\n", "top level must be a mapping"),
    case("invalid-yaml", "model: [\n", "not valid YAML"),
    # types
    case("str-for-int", DIGITS_BASE + "train:\n  max_steps: '7'\n", "train.max_steps must be int, got '7'"),
    case("bool-for-int", DIGITS_BASE + "moe:\n  num_experts: true\n", "moe.num_experts must be int, got True"),
    case("float-for-int", DIGITS_BASE + "train:\n  global_batch_size: 12.5\n",
         "train.global_batch_size must be int, got 12.5"),
    case("list-for-float", DIGITS_BASE + "optim:\n  lr: [0.1]\n", "optim.lr must be float, got [0.1]"),
    case("bool-for-float", DIGITS_BASE + "moe:\n  capacity: true\n", "moe.capacity must be float, got True"),
    case("str-for-bool", DIGITS_BASE + "model:\n  learn_sigma: maybe\n", "model.learn_sigma must be bool, got 'maybe'"),
    case("int-for-str", DIGITS_BASE + "train:\n  out_dir: 5\n", "train.out_dir must be str, got 5"),
    case("null-for-int", DIGITS_BASE + "train:\n  max_steps: null\n", "train.max_steps must be int, got None"),
    case("betas-length", DIGITS_BASE + "optim:\n  betas: [0.9]\n", "optim.betas must be a list of 2 numbers"),
    case("betas-item-type", DIGITS_BASE + "optim:\n  betas: [0.9, high]\n", "optim.betas[1] must be float, got 'high'"),
    case("bad-literal", DIGITS_BASE + "moe:\n  ffn: sparse\n",
         "moe.ffn must be one of ['dense', 'token_choice', 'expert_choice', 'diffmoe'], got 'sparse'"),
    case("bad-literal-size", DIGITS_BASE + "model:\n  size: xl\n", "model.size must be one of ['S', 'B', 'L', 'XL'], got 'xl'"),
    case("bad-literal-objective", DIGITS_BASE + "diffusion:\n  objective: edm\n", "diffusion.objective must be one of"),
    # cross-field
    case("experts-vs-ep", DIGITS_BASE + "parallel:\n  ep: 3\n",
         "moe.num_experts: 4 experts cannot be split evenly over parallel.ep=3"),
    case("capacity-zero", DIGITS_BASE + "moe:\n  capacity: 0\n", "moe.capacity: must be positive"),
    case("capacity-negative", DIGITS_BASE + "moe:\n  capacity: -0.5\n", "moe.capacity: must be positive"),
    case("patch-vs-input", DIGITS_BASE + "model:\n  patch_size: 3\n", "model.patch_size: must divide model.input_size=8"),
    case("patch-zero", DIGITS_BASE + "model:\n  patch_size: 0\n", "model.patch_size: must divide"),
    case("heads-vs-hidden", DIGITS_BASE + "model:\n  num_heads: 3\n", "model.num_heads: must divide model.hidden_size=128"),
    case("depth-missing", "model:\n  hidden_size: 64\n  num_heads: 4\n", "model.depth: not set"),
    case("zero3-moe", DIGITS_BASE + "parallel:\n  zero_stage: 3\n", "parallel.zero_stage: ZeRO-3 does not support MoE"),
    case("zero-stage-4", DIGITS_BASE + "moe:\n  ffn: dense\nparallel:\n  zero_stage: 4\n",
         "parallel.zero_stage: must be 0, 1, 2 or 3"),
    case("sampler-vs-ddpm", DIGITS_BASE + "diffusion:\n  objective: ddpm\n",
         "sample.sampler: 'euler' does not fit diffusion.objective='ddpm'"),
    case("sampler-vs-flow", DIGITS_BASE + "sample:\n  sampler: ddim\n",
         "sample.sampler: 'ddim' does not fit diffusion.objective='flow'"),
    case("ddpm-steps", DIGITS_BASE + "diffusion:\n  objective: ddpm\n  num_timesteps: 100\nsample:\n  sampler: ancestral\n"
         "  steps: 250\n", "sample.steps: cannot exceed diffusion.num_timesteps=100"),
    case("ec-pool", DIGITS_BASE + "moe:\n  ffn: expert_choice\n  pool: local\n", "moe.pool: expert_choice routes within each sample"),
    case("tc-top-k", DIGITS_BASE + "moe:\n  ffn: token_choice\n  top_k: 5\n", "moe.top_k: must be in [1, moe.num_experts=4]"),
    case("ema-decay", DIGITS_BASE + "train:\n  ema_decay: 1.0\n", "train.ema_decay: must be in [0, 1)"),
    case("digits-size", DIGITS_BASE + "model:\n  input_size: 32\n", "model.input_size: the digits dataset is 8x8"),
    case("digits-classes", DIGITS_BASE + "model:\n  num_classes: 1000\n", "model.num_classes: the digits dataset has 10 classes"),
    case("latents-without-path", IMAGENET_BASE + "data:\n  path: null\n", "data.path: the latents dataset needs"),
    case("tc-with-ep", DIGITS_BASE + "moe:\n  ffn: token_choice\nparallel:\n  ep: 2\n",
         "parallel.ep: the token_choice baseline runs without expert parallelism"),
    case("tp-vs-heads", DIGITS_BASE + "parallel:\n  tp: 3\n", "parallel.tp: must divide model.num_heads=4"),
    case("tp-vs-ffn-width", DIGITS_BASE + "model:\n  mlp_ratio: 1.3\nparallel:\n  tp: 4\n",
         "parallel.tp: must divide the FFN width 166"),
    case("compile-with-tp", DIGITS_BASE + "train:\n  compile: true\nparallel:\n  tp: 2\n",
         "train.compile: compiled blocks are not supported with tensor parallelism"),
    case("grad-accum-zero", DIGITS_BASE + "train:\n  grad_accum_steps: 0\n", "train.grad_accum_steps: must be at least 1"),
    case("checkpoint-every-zero", DIGITS_BASE + "parallel:\n  activation_checkpointing_every: 0\n",
         "parallel.activation_checkpointing_every: must be at least 1"),
    case("nonfinite-zero", DIGITS_BASE + "train:\n  max_nonfinite_steps: 0\n",
         "train.max_nonfinite_steps: must be at least 1"),
    case("keep-last-zero", DIGITS_BASE + "checkpoint:\n  keep_last: 0\n", "checkpoint.keep_last: must be at least 1"),
    case("checkpoint-negative", DIGITS_BASE + "checkpoint:\n  every_steps: -5\n", "checkpoint.every_steps: must be >= 0"),
    case("keep-every-negative", DIGITS_BASE + "checkpoint:\n  keep_every: -1\n", "checkpoint.keep_every: must be >= 0"),
    case("bad-precision", DIGITS_BASE + "train:\n  precision: fp8\n", "train.precision must be one of"),
    case("tiny-reduce-bucket", DIGITS_BASE + "parallel:\n  reduce_bucket_size: 1000\n",
         "parallel.reduce_bucket_size: must be at least 1000000 elements (got 1000)"),
    case("tiny-allgather-bucket", DIGITS_BASE + "parallel:\n  allgather_bucket_size: 0\n",
         "parallel.allgather_bucket_size: must be at least 1000000"),
    case("overlap-not-bool", DIGITS_BASE + "parallel:\n  overlap_comm: maybe\n", "parallel.overlap_comm must be bool"),
    case("peak-negative", DIGITS_BASE + "train:\n  peak_tflops: -1\n", "train.peak_tflops: must be positive and finite"),
    # files
    case("missing-file", None, "config file not found", named="bad.yaml"),
    case("missing-base", "base: nowhere.yaml\n", "base file", named="nowhere.yaml"),
    case("base-cycle", "base: other.yaml\n", "'base' links form a cycle", files={"other.yaml": "base: bad.yaml\n"}),
    case("base-self-cycle", "base: bad.yaml\n", "'base' links form a cycle"),
    # --set
    case("set-no-equals", DIGITS_BASE, "--set 'train.max_steps': expected section.key=value",
         overrides=["train.max_steps"]),
    case("set-no-section", DIGITS_BASE, "--set 'max_steps=7': expected section.key=value",
         overrides=["max_steps=7"]),
    case("set-too-deep", DIGITS_BASE, "--set 'model.size.x=1': expected section.key=value",
         overrides=["model.size.x=1"]),
    case("set-empty-part", DIGITS_BASE, "--set '.max_steps=7': expected section.key=value",
         overrides=[".max_steps=7"]),
    case("set-section-not-mapping", DIGITS_BASE + "logging: 5\n", "section 'logging' is not a mapping",
         overrides=["logging.every_steps=3"]),
    case("set-unknown-key", DIGITS_BASE, "unknown key moe.num_expert", overrides=["moe.num_expert=4"]),
    case("set-unknown-section", DIGITS_BASE, "unknown key trian", overrides=["trian.max_steps=4"]),
    case("set-ill-typed", DIGITS_BASE, "train.max_steps must be int, got 'seven'", overrides=["train.max_steps=seven"]),
    case("set-bad-choice", DIGITS_BASE, "moe.ffn must be one of", overrides=["moe.ffn=moe"]),
]

# Gaps found while writing these tests, now closed in config.py.
FIXED_GAPS = [
    case("ep-zero", DIGITS_BASE + "parallel:\n  ep: 0\n", "parallel.ep: must be at least 1"),
    case("base-not-a-string", "base: 5\n", "base must be a file path"),
    case("set-invalid-yaml", DIGITS_BASE, "value is not valid YAML", overrides=["train.out_dir=["]),
    case("hidden-not-multiple-of-4", DIGITS_BASE + "model:\n  hidden_size: 130\n  num_heads: 2\n",
         "model.hidden_size: must be a multiple of 4"),
    case("negative-input-size", IMAGENET_BASE + "model:\n  input_size: -32\n", "model.input_size: must be positive"),
    case("infinite-capacity", DIGITS_BASE + "moe:\n  capacity: .inf\n", "moe.capacity: must be positive and finite"),
]


def load_case(c, tmp_path):
    for name, text in c["files"].items():
        (tmp_path / name).write_text(text)
    bad = tmp_path / "bad.yaml"
    if c["text"] is not None:
        bad.write_text(c["text"])
    with pytest.raises(ConfigError) as info:
        load_config(bad, c["overrides"])
    return str(info.value)


@pytest.mark.parametrize("c", [pytest.param(c, id=c["id"], marks=c["marks"]) for c in BAD_CASES + FIXED_GAPS])
def test_bad_config_message(c, tmp_path):
    message = load_case(c, tmp_path)
    assert c["fragment"] in message


@pytest.mark.parametrize("c", [pytest.param(c, id=c["id"], marks=c["names_file_marks"]) for c in BAD_CASES])
def test_bad_config_message_names_file(c, tmp_path):
    message = load_case(c, tmp_path)
    assert str(tmp_path / c["named"]) in message, message


def test_good_config_passes_the_bad_case_machinery(tmp_path):
    """The cases differ from a loadable config only where they say (so each fails for its own reason)."""
    (tmp_path / "good.yaml").write_text(DIGITS_BASE)
    assert load_config(tmp_path / "good.yaml") == load_config(DIGITS_CONFIG)
    (tmp_path / "good.yaml").write_text(IMAGENET_BASE)
    assert load_config(tmp_path / "good.yaml") == load_config(IMAGENET_DIR / "diffmoe_l_e8_flow.yaml")


# ----------------------------------------------------------------------------------------------
# The entry point rejects a bad config before importing anything heavy


@pytest.fixture
def no_deepspeed_env(tmp_path):
    """An environment where `import deepspeed` exits 99 with a marker on stderr."""
    fake = tmp_path / "fake_modules" / "deepspeed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import sys\nsys.stderr.write('FAKE DEEPSPEED IMPORTED\\n')\nsys.exit(99)\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(fake.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    control = subprocess.run([PYTHON, "-c", "import deepspeed"], env=env, capture_output=True, text=True, timeout=60)
    assert control.returncode == 99 and "FAKE DEEPSPEED IMPORTED" in control.stderr  # the trap works
    return env


@pytest.mark.parametrize("text,overrides,key", [
    ("moe:\n  num_expert: 4\n", [], "moe.num_expert"),
    ("", ["--set", "train.max_steps=seven"], "train.max_steps"),
    ("parallel:\n  zero_stage: 3\n", [], "parallel.zero_stage"),
], ids=["unknown-key", "set-ill-typed", "zero3-moe"])
def test_cli_rejects_bad_config_before_deepspeed(text, overrides, key, tmp_path, no_deepspeed_env):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DIGITS_BASE + text)
    result = subprocess.run([PYTHON, "pretrain_diffmoe.py", "--config", str(bad), *overrides], cwd=REPO,
                            env=no_deepspeed_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "FAKE DEEPSPEED IMPORTED" not in result.stderr
    assert "Traceback" not in result.stderr
    assert re.match(r"config error: ", result.stderr), result.stderr
    assert key in result.stderr and str(bad) in result.stderr


def test_cli_rejects_missing_config(tmp_path, no_deepspeed_env):
    missing = tmp_path / "missing.yaml"
    result = subprocess.run([PYTHON, "pretrain_diffmoe.py", "--config", str(missing)], cwd=REPO,
                            env=no_deepspeed_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("config error: ") and str(missing) in result.stderr


def test_float_written_without_a_dot_is_a_float():
    # YAML reads "1e-4" as a string; a float field must still take it.
    config = load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", ["optim.lr=1e-4"])
    assert config.optim.lr == 1e-4
