"""The benchmarks run end to end at their smallest settings and print well-formed, self-consistent
results: JSON lines first, then the table. Times are never asserted (the benchmarks report them)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import clean_env

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str) -> tuple[list[dict], list[str]]:
    """(the result lines, the table lines after them)."""
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    lines = result.stdout.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert lines[:len(records)] == [line for line in lines if line.startswith("{")], "JSON lines must come first"
    return records, [line for line in lines[len(records):] if line.strip()]


@pytest.mark.slow
def test_dispatch_bytes_are_the_analytical_minimum():
    width, experts, pool = 64, 4, 256
    records, table = run_benchmark("dispatch_bytes.py", "--widths", str(width), "--experts", str(experts),
                                   "--tokens", str(pool))
    assert [r["rank"] for r in records] == [0, 1]
    local, fp32 = pool // 2, 4
    for r in records:
        assert r["ours_bytes"] == r["minimum_bytes"] == r["counted_bytes"] > 0, r
        assert r["ours/minimum"] == 1.0
        # DeepSpeed sends the other rank's experts' buffers, padded to capacity ceil(N_local / E), in its
        # dispatch and combine, forward and backward.
        assert r["deepspeed_bytes"] == 4 * (experts // 2) * (local // experts) * width * fp32
        assert r["deepspeed/minimum"] == pytest.approx(r["deepspeed_bytes"] / r["minimum_bytes"], abs=1e-4)
        assert r["routing_all_gather_bytes"] == local * 2 * experts * fp32  # scores and predictor probabilities
        assert r["other_bytes"] == {"ours": 0, "deepspeed": 0}
    assert "ours/min" in table[0] and len(table) == 1 + len(records)


@pytest.mark.slow
def test_step_benchmark_reports_consistent_layouts_and_ratios():
    records, table = run_benchmark("step.py", "--configs", "digits", "--layouts", "single,ep2",
                                   "--checkpointing", "off", "--compile", "off", "--repeats", "1", "--steps", "1")
    layouts = {r["layout"]: r for r in records if r["kind"] == "layout"}
    assert {name: r["processes"] for name, r in layouts.items()} == {"single": 1, "ep2": 2}
    for r in layouts.values():
        times = r["step_time_ms"]
        assert 0 < times["min"] <= times["median"] <= times["max"]
        assert r["tokens_per_step"] == 128 * 16  # the digits config: batch 128, 4 x 4 patches
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / times["median"] * 1e3, rel=1e-3)
        assert r["peak_memory_mb"] > 0
    (ratio,) = [r for r in records if r["kind"] == "ratio"]
    assert ratio["ratio"] == "ep2/single"
    expected = layouts["ep2"]["step_time_ms"]["median"] / layouts["single"]["step_time_ms"]["median"]
    # One repetition: its own ratio, printed to 3 decimals.
    assert ratio["step_time"]["median"] == pytest.approx(expected, rel=2e-3, abs=5e-4)
    assert ratio["peak_memory"] == pytest.approx(
        layouts["ep2"]["peak_memory_mb"] / layouts["single"]["peak_memory_mb"], abs=1e-3)
    assert sum(line.startswith("digits") for line in table) == 3


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_moe_layer_baselines_compute_our_layer_with_our_weights():
    """The per-expert loop is our routing without batching, and DeepSpeed's experts hold our experts' weights."""
    from diffmoe_scale.models import DiffMoELayer

    moe_layer = load_benchmark("moe_layer")
    torch.manual_seed(0)
    layer = DiffMoELayer(16, 32, 4, pool="local").double().train()
    torch.nn.init.normal_(layer.router.weight)  # spread-out scores: no ties in top-C
    x = torch.randn(2, 24, 16, dtype=torch.float64)
    ours, _ = layer(x)
    torch.testing.assert_close(moe_layer.loop_reference(layer, x), ours.reshape(-1, 16))
    tokens = x.reshape(-1, 16)
    for e in range(4):
        torch.testing.assert_close(moe_layer.ExpertFFN(layer, e).double()(tokens), layer.experts.expert(e, tokens))


@pytest.mark.slow
def test_moe_layer_benchmark_reports_every_baseline_consistently():
    records, table = run_benchmark("moe_layer.py", "--sizes", "S", "--tokens", "512", "--experts", "4",
                                   "--repeats", "1")
    assert [r["name"] for r in records] == ["dense", "dense_predictor", "deepspeed", "loop"]
    assert len({r["ours_ms"] for r in records}) == 1 and len({r["ours_peak_mb"] for r in records}) == 1
    for r in records:
        assert r["ratio_min"] == r["ratio"] == r["ratio_max"]  # one repetition: its own ratio
        assert r["ratio"] == pytest.approx(r["ours_ms"] / r["baseline_ms"], rel=1e-2)
        assert r["baseline_peak_mb"] > 0
    dense = records[0]
    assert dense["ours_peak_mb"] > dense["baseline_peak_mb"]  # four experts' weight gradients against one FFN's
    assert table[1].split()[:3] == ["S", "4", "512"]


def test_gpu_script_parses_and_its_random_latents_fit_the_l_e8_config(tmp_path):
    """benchmarks/gpu.sh needs a GPU to run; here: its syntax, and the data its training steps read."""
    from diffmoe_scale.config import load_config
    from diffmoe_scale.data.latents import build_latent_dataset

    assert subprocess.run(["bash", "-n", "benchmarks/gpu.sh"], cwd=REPO).returncode == 0
    spec = importlib.util.spec_from_file_location("random_latents", REPO / "benchmarks/random_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path), "--images", "16"]) == 0
    config = load_config(REPO / "configs/imagenet/diffmoe_l_e8_flow.yaml",
                         [f"data.path={tmp_path}", "data.hflip=false", "train.global_batch_size=16"])
    latents, labels = build_latent_dataset(config).batch(torch.arange(4))
    assert latents.shape == (4, 4, 32, 32) and labels.max() < 1000
