"""The host-sync budget: what would make the host wait for a GPU (a value or size read back, boolean-mask
indexing, `nonzero`, `bincount`, a blocking copy, ...), counted under pretend CUDA (tests/pretend_cuda.py).

Budget: a training step of the MoE path waits for the device 0 times per MoE layer on one process and once
with expert parallelism (the all-to-all's split sizes); inference once per MoE layer (the expert batch
sizes). The trainer reads the host once per step beyond that (the skip decision) and more only at logging
steps."""
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from diffmoe_scale.config import load_config
from diffmoe_scale.diffusion import build_objective
from diffmoe_scale.models import DiffMoELayer, build_model
from diffmoe_scale.parallel.expert_parallel import apply_threshold_quantiles, take_pending_quantiles
from diffmoe_scale.train.capacity import CapacityByCondition
from tests.helpers import clean_env
from tests.pretend_cuda import pretend_cuda

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/digits_diffmoe_e4_flow.yaml"


def test_a_diffmoe_layer_trains_without_waiting_for_the_device():
    with pretend_cuda() as mode:
        layer = DiffMoELayer(32, 64, 4, capacity=1.5).train().to("cuda")
        x = torch.randn(3, 16, 32, device="cuda", requires_grad=True)
        mode.reset_counts()
        out, losses = layer(x)
        (out.square().mean() + losses["predictor"]).backward()
        layer.update_thresholds()
    assert mode.sync_sites == []


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_a_model_training_step_never_waits_for_the_device(runtime, checkpointing):
    """Forward, losses, backward, threshold update and capacity statistics of the whole DiT."""
    config = load_config(CONFIG)
    objective = build_objective(config)
    no_cuda_rng = mock.patch("torch.utils.checkpoint.get_device_states", lambda *args: ([], []))  # needs real CUDA
    with pretend_cuda() as mode, no_cuda_rng:
        model = build_model(config).to("cuda").train()
        for block in model.blocks:
            block.checkpoint = checkpointing
        images, labels = torch.randn(8, 1, 8, 8, device="cuda"), torch.arange(8, device="cuda")
        noise, t = torch.randn_like(images), torch.rand(8, device="cuda")
        capacity = CapacityByCondition(config.model.num_classes, "cuda")
        mode.reset_counts()
        losses = objective.training_losses(model, images, labels, noise, t)
        sum(losses.values()).backward()
        apply_threshold_quantiles(model, take_pending_quantiles(model))
        capacity.add(model, objective.noise_level(t), labels)
    assert mode.sync_sites == []


@pytest.mark.parametrize("routing", ["threshold", "batch_independent"])
def test_inference_reads_the_expert_batch_sizes_once_per_moe_layer(routing):
    config = load_config(CONFIG, [f"moe.inference_routing={routing}"])
    with pretend_cuda() as mode:
        model = build_model(config).to("cuda").eval()
        for layer in model.moe_layers():
            layer.thresholds.fill_(0.5)
        x, labels = torch.randn(4, 1, 8, 8, device="cuda"), torch.arange(4, device="cuda")
        mode.reset_counts()
        with torch.no_grad():
            model(x, torch.full((4,), 0.5, device="cuda"), labels)
    assert sites(mode.sync_sites) == ["tolist at experts.py"] * len(model.moe_layers())


def sites(found: list[str]) -> list[str]:
    """"op at file:line" -> "op at file"."""
    return [site.rsplit(":", 1)[0] for site in found]


def run_trainer(tmp_path, nproc: int, *overrides: str) -> dict:
    result = tmp_path / "syncs.json"
    script = ["tests/distributed/host_sync_worker.py", str(result), "--config", CONFIG]
    for override in ("train.global_batch_size=16", f"train.out_dir={tmp_path / 'run'}", *overrides):
        script += ["--set", override]
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(nproc)]
    command = launcher + script if nproc > 1 else [sys.executable, *script]
    done = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(result.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("nproc,overrides,per_layer", [
    (1, [], 0),
    (2, ["parallel.ep=2"], 1),
], ids=["one_process", "ep2"])
def test_the_real_trainers_host_reads(tmp_path, nproc, overrides, per_layer):
    """Per micro-batch: `per_layer` reads per MoE layer (EP: the owner counts that size the all-to-all). Per step
    besides: one (the skip decision: the losses' finiteness with the gradient norm). Logging steps read more."""
    syncs = run_trainer(tmp_path, nproc, *overrides)
    layers = syncs["moe_layers"]
    split_sizes = ["tolist at diffmoe.py"] * layers * per_layer
    for forward_backward in syncs["forward_backward"]:
        assert sites(forward_backward) == split_sizes
    for step in syncs["step"]:  # step 1 logs nothing, step 2 logs (after train_step returns)
        assert sites(step) == split_sizes + ["tolist at health.py"]
    assert [sites(found) for found in syncs["inference"]] == [["tolist at experts.py"] * layers]
