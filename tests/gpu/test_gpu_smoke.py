"""The GPU smoke suite: the product on a real GPU, where one exists (skipped, with the reason, where none does).

One GPU, bf16, a small ImageNet-shaped model (4-channel 32x32 latents, 256 tokens per image) on random
latents: train, checkpoint, resume bit-exactly (train.deterministic), consolidate on CPU-only processes,
export, sample with a VAE, evaluate with an Inception network file. Two ranks on the one GPU (gloo over
CUDA tensors, every collective checked for CUDA tensors as NCCL would) with EP=2 and with TP=2.

    pytest tests/gpu            # on a GPU node, after launch/bootstrap.sh
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import clean_env, read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the GPU smoke suite needs a CUDA GPU (none here); run `pytest tests/gpu` on one")

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/digits_diffmoe_e4_flow.yaml"
CLASSES = 10


def model_overrides(latents: Path, out_dir: Path) -> list[str]:
    return ["data.dataset=latents", f"data.path={latents}", "model.input_size=32", "model.in_channels=4",
            f"model.num_classes={CLASSES}", "model.depth=4", "model.hidden_size=256", "model.num_heads=4",
            "train.precision=bf16", "parallel.zero_stage=1", "train.global_batch_size=16", "logging.every_steps=1",
            "sample.steps=4", "sample.per_class=2", f"train.out_dir={out_dir}"]


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    """Random 4x32x32 latents of 10 classes in launch/extract_latents.py's layout."""
    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    count = 256
    np.save(root / "shard_00000.npy", rng.standard_normal((count, 1, 4, 32, 32)).astype(np.float16))
    np.save(root / "labels.npy", np.arange(count, dtype=np.int64) % CLASSES)
    index = {"format": 1, "num_images": count, "latent_shape": [4, 32, 32], "flip": False, "vae": "random",
             "scale_factor": 0.18215, "image_size": 64, "posterior": "mean", "seed": 0,
             "classes": [f"c{k}" for k in range(CLASSES)], "shards": [{"file": "shard_00000.npy", "count": count}]}
    (root / "index.json").write_text(json.dumps(index))
    return root


def run(command: list[str], env: dict | None = None, timeout: int = 900) -> str:
    result = subprocess.run(command, cwd=REPO, env={**clean_env(), **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{output[-6000:]}"
    return output


def train(overrides: list[str], *extra: str) -> str:
    command = [sys.executable, "pretrain_diffmoe.py", "--config", CONFIG, *extra]
    for override in overrides:
        command += ["--set", override]
    return run(command)


DETERMINED = ("loss", "predictor_loss", "grad_norm", "c_avg", "capacity")


def test_one_gpu_trains_resumes_exactly_and_its_checkpoint_serves_every_tool(latents, vae_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    exact = ["train.deterministic=true", "checkpoint.every_steps=3"]
    train([*model_overrides(latents, straight), *exact, "train.max_steps=6"])
    train([*model_overrides(latents, resumed), *exact, "train.max_steps=3"])
    output = train([*model_overrides(latents, resumed), *exact, "train.max_steps=6"])
    assert f"resumed from {resumed}/checkpoints/step_00000003 at step 3" in output
    for ours, theirs in zip(read_metrics(resumed), read_metrics(straight), strict=True):
        assert {k: ours[k] for k in DETERMINED} == {k: theirs[k] for k in DETERMINED}, ours["step"]
    assert (straight / "samples_latent_channels.png").is_file()  # no data.vae: the latents, labelled

    checkpoint = straight / "checkpoints" / "step_00000006"
    run([sys.executable, "launch/checkpoint.py", "consolidate", str(checkpoint)])  # CPU processes
    weights = tmp_path / "ema.safetensors"
    run([sys.executable, "launch/checkpoint.py", "export-ema", str(checkpoint), "--out", str(weights)])
    run([sys.executable, "launch/sample.py", "--weights", str(weights), "--out", str(tmp_path / "eval"),
         "--num-samples", "20", "--batch-size", "8", "--steps", "4", "--vae", str(vae_dir)])
    assert json.loads((tmp_path / "eval" / "sampling.json").read_text())["precision"] == "bf16"  # auto on a GPU
    from diffmoe_scale.eval.evaluators import InceptionEvaluator
    from tests.test_sample import StandInInception

    network = tmp_path / "inception.pt"
    torch.jit.script(StandInInception()).save(str(network))
    samples = tmp_path / "eval" / "samples.npz"
    run([sys.executable, "launch/evaluate.py", str(samples), "--inception", str(network), "--write-reference",
         str(tmp_path / "reference.npz")])
    scores = run([sys.executable, "launch/evaluate.py", str(samples), "--inception", str(network), "--reference",
                  str(tmp_path / "reference.npz")])
    assert json.loads(scores.strip().splitlines()[-1])["fid"] == pytest.approx(0, abs=1e-3)  # samples vs themselves
    with np.load(samples) as data:
        images = data["arr_0"]
    on_gpu = InceptionEvaluator(network)
    assert on_gpu.device.type == "cuda"
    assert np.allclose(on_gpu.features(images), InceptionEvaluator(network, device="cpu").features(images), atol=1e-5)


@pytest.mark.parametrize("layout", [["parallel.ep=2"], ["parallel.tp=2", "parallel.zero_stage=2"]], ids=["ep2", "tp2"])
def test_two_ranks_on_one_gpu_hand_every_collective_cuda_tensors(latents, tmp_path, layout):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "tests/gpu/cuda_worker.py", "--config", CONFIG]
    for override in (*model_overrides(latents, tmp_path), "train.max_steps=3", *layout):
        command += ["--set", override]
    run(command, env={"DIFFMOE_DIST_BACKEND": "gloo"})
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2, 3]
    assert os.path.isfile(tmp_path / "checkpoints" / "step_00000003" / "manifest.json")
