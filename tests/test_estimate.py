"""launch/estimate.py's numbers against what training really holds, keeps and sends, counted on this CPU.

Activations: the bytes a training forward keeps for backward (saved-tensor hooks and the routing
tapes of checkpointed blocks, each storage once) of the digits model and of an S-width model at
ImageNet's 256 tokens per image, with and without checkpointing, with the flash and the math
attention kernel. Model state: every tensor the DeepSpeed engine's optimizer, the model and the EMA
hold, sampled during real training steps, in one process (ZeRO 0 and 1) and with EP=2, ZeRO 2, bf16
and checkpointing on two processes, which also count the bytes their all-to-alls and routing
all-gathers send. Each within the issue's 10%.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffmoe_scale.config import load_config
from diffmoe_scale.estimate import MODEL_STATE_KINDS, PRECISION_BYTES, activation_bytes, estimate, layout_of
from diffmoe_scale.estimate_check import forward_activation_bytes
from diffmoe_scale.models import build_model
from tests.helpers import clean_env

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DIGITS = "configs/digits_diffmoe_e4_flow.yaml"
S_WIDTH = "configs/imagenet/diffmoe_s_e8_flow.yaml"
TOLERANCE = 0.10  # the bound; the errors measured are printed by `launch/estimate.py --measure`
KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def assert_close(estimated: float, measured: float, what: str):
    assert abs(estimated - measured) <= TOLERANCE * measured, f"{what}: estimated {estimated:,}, measured {measured:,}"


def checkpointing(every: int) -> list[str]:
    return [f"parallel.activation_checkpointing={every > 0}",
            f"parallel.activation_checkpointing_every={max(every, 1)}"]


@pytest.mark.parametrize("path, overrides, precision, attention, every", [
    (DIGITS, [], "fp32", "flash", 0),
    (DIGITS, [], "fp32", "flash", 2),  # dense blocks keep their input only, MoE blocks everything
    (S_WIDTH, ["model.depth=2"], "bf16", "flash", 0),  # what GPUs run
    (S_WIDTH, ["model.depth=2"], "fp32", "math", 0),  # the softmax matrix: 256 x 256 per head and image
    (S_WIDTH, ["model.depth=2"], "bf16", "flash", 1),
])
def test_activations_match_what_the_forward_keeps(path, overrides, precision, attention, every):
    from diffmoe_scale.parallel.parallelize import apply_activation_checkpointing

    micro_batch = 2 if path == S_WIDTH else 8
    config = load_config(REPO / path, [*overrides, f"train.precision={precision}", *checkpointing(every),
                                       f"train.global_batch_size={micro_batch}"])
    torch.manual_seed(0)
    model = build_model(config).to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
    if every:
        apply_activation_checkpointing(model, every)
    with sdpa_kernel(KERNELS[attention]):
        measured = forward_activation_bytes(config, model, micro_batch)
    estimated = activation_bytes(config, layout_of(config, 1, attention))["activations"]
    assert_close(estimated, measured, f"{path} {precision} {attention} checkpointing every {every}")


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_one_process_model_state_matches_the_engine(zero_stage, runtime, tmp_path):
    from diffmoe_scale.estimate_check import measure

    config = load_config(REPO / DIGITS, [f"parallel.zero_stage={zero_stage}", "train.global_batch_size=32",
                                         f"train.out_dir={tmp_path}"])
    measured = measure(config, runtime)
    estimated = estimate(config, layout_of(config, 1))["memory"]
    for kind in (*MODEL_STATE_KINDS, "activations"):
        assert_close(estimated[kind], measured[kind], f"ZeRO {zero_stage} {kind}")
    assert (measured["master_weights"] > 0) == (zero_stage > 0)  # ZeRO keeps an fp32 copy even of fp32 weights


@pytest.mark.slow
def test_ep2_zero2_bf16_checkpointing_on_two_processes(tmp_path):
    """Dense optimizer state and gradients partitioned over the two ranks, experts (one shard each) not;
    the all-to-alls and all-gathers of the recomputed forwards counted too."""
    overrides = ["parallel.ep=2", "parallel.zero_stage=2", "train.precision=bf16", *checkpointing(1),
                 "train.global_batch_size=64", f"train.out_dir={tmp_path}"]
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "launch/estimate.py",
           "--config", DIGITS, "--measure", "--json", *(arg for o in overrides for arg in ("--set", o))]
    result = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    estimated = {**report["estimate"]["memory"], **report["estimate"]["communication"]}
    assert len(report["measured"]) == 2
    for rank, measured in enumerate(report["measured"]):
        for kind, value in measured.items():
            assert_close(estimated[kind], value, f"rank {rank} {kind}")
    # ZeRO 2 partitions the dense gradients (fp32) over the two ranks, not the experts' (one replica each).
    gradients, parameters = estimated["gradients"] // 4, estimated["parameters"] // 2
    assert gradients < parameters < 2 * gradients


def test_cli_plans_a_layout_and_names_the_bad_key(capsys):
    from launch.estimate import main

    assert main(["--config", "configs/imagenet/diffmoe_l_e8_flow.yaml", "--world-size", "8",
                 "--set", "train.precision=bf16", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    config_case, other = plan["estimates"]
    assert config_case["layout"]["micro_batch"] == 256 // 8 and config_case["layout"]["expert_dp"] == 1
    assert (config_case["layout"]["checkpoint_every"], other["layout"]["checkpoint_every"]) == (0, 1)
    assert other["memory"]["activations"] < config_case["memory"]["activations"] / 10
    params, dim, moe_layers = config_case["parameters"], 1024, 12
    assert params["experts"] == moe_layers * 8 * (2 * dim * 4 * dim + 4 * dim + dim)
    assert params["per_rank_experts"] == params["experts"] // 8
    assert params["routing"] == moe_layers * (8 * dim + dim * dim + dim + dim * 8 + 8)  # router, predictor
    local = params["per_rank_dense"] + params["per_rank_experts"]
    assert config_case["memory"]["parameters"] == local * PRECISION_BYTES["bf16"]
    assert main(["--config", DIGITS, "--set", "parallel.ep=2", "--world-size", "3"]) == 2
    assert "parallel.ep: 2 does not divide the data-parallel size 3" in capsys.readouterr().err


def test_the_estimate_follows_the_bucket_settings():
    def buckets(*overrides):  # bf16 unless overridden
        config = load_config(REPO / "configs/imagenet/diffmoe_l_e8_flow.yaml", ["train.precision=bf16", *overrides])
        return estimate(config, layout_of(config, 8))["memory"]["reduce_bucket"]

    assert buckets("parallel.zero_stage=1", "parallel.overlap_comm=false") == 50_000_000 * 2
    assert buckets("parallel.zero_stage=2", "parallel.overlap_comm=false", "parallel.reduce_bucket_size=200000000") == 4e8
    assert buckets("parallel.zero_stage=2") == 2 * 50_000_000 * 2  # overlap: two buckets, one filling, one reduced
    assert buckets("parallel.zero_stage=0", "train.precision=fp32") == 0
