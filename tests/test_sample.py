"""launch/sample.py and launch/evaluate.py on a checkpoint of the digits config: one rank, EP=2, and two
ranks stopped by SIGUSR1 after a named token pool, then damaged and rerun, write the same samples.npz
byte for byte; the threshold-offset search keeps the best offset; evaluate.py scores digits and computes
FID / IS through an Inception network file."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmoe_scale.data import load_digits_images
from diffmoe_scale.eval.fid import feature_statistics, frechet_distance, inception_score
from tests.helpers import clean_env, launch_tool, train_and_export_ema

REPO = Path(__file__).resolve().parents[1]
# The trained thresholds: after the 30 steps of `trained` their average (the default) still holds mostly the
# initial 0, and every expert would take every token.
SAMPLE = ["--num-samples", "40", "--batch-size", "8", "--steps", "4", "--thresholds", "copy"]

pytestmark = pytest.mark.slow


def run(*args: str, expected: int = 0, env: dict = ()) -> str:
    command = [sys.executable, *args] if args[0] != "torchrun" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args[1:]]
    result = subprocess.run(command, cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1", **dict(env)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == expected, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def samples(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(directory / "samples.npz") as data:
        return data["arr_0"], data["arr_1"]


@pytest.fixture(scope="module")
def one_rank(trained, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("one_rank")
    return out, run("launch/sample.py", "--weights", str(trained / "ema.safetensors"), "--out", str(out), *SAMPLE)


def test_one_rank_and_ep2_write_the_same_samples(trained, one_rank, tmp_path):
    one, output = one_rank
    run("torchrun", "launch/sample.py", "--weights", str(trained / "checkpoints" / "step_00000030_consolidated"),
        "--out", str(tmp_path / "ep2"), "--ep", "2", *SAMPLE)
    images, labels = samples(one)
    assert images.shape == (40, 8, 8, 1) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(40)]
    assert (tmp_path / "ep2" / "samples.npz").read_bytes() == (one / "samples.npz").read_bytes()
    assert sorted(p.name for p in (tmp_path / "ep2" / "shards").glob("*.npz"))[:2] == [
        "samples_00000000_00000004.npz", "samples_00000004_00000008.npz"]  # each rank its half of a pool
    summary = json.loads((one / "sampling.json").read_text())
    assert summary["step"] == 30 and summary["num_samples"] == 40 and 0 < summary["c_avg"] < 4
    assert summary["precision"] == "fp32"  # auto: no bf16 without a GPU
    assert f"inference C_avg {summary['c_avg']:.3f}" in output and "sampled 40/40 (" in output
    assert (one / "grid.png").is_file()
    from diffmoe_scale.config import load_config
    from diffmoe_scale.eval.sampling_estimate import sampling_estimate

    estimate = sampling_estimate(load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", ["parallel.ep=2"]), 2,
                                 num_samples=40, batch_size=8)
    with np.load(tmp_path / "ep2" / "shards" / "samples_00000000_00000004.npz") as shard:
        assert shard["images"].nbytes == estimate["shard_bytes"]
    assert len(list((tmp_path / "ep2" / "shards").glob("samples_*"))) == estimate["shards"] == 10


def test_two_ranks_stopped_damaged_and_rerun_write_what_one_rank_does(trained, one_rank, tmp_path):
    one, _ = one_rank
    command = ("torchrun", "launch/sample.py", "--weights", str(trained / "ema.safetensors"), "--out", str(tmp_path),
               *SAMPLE)
    stopped = run(*command, expected=1, env={"DIFFMOE_FAULT": "sigusr1@pool:2", "DIFFMOE_FAULT_RANK": "0"})
    assert re.search(r"exitcode\s*: 75", stopped) and "stopped; the same command continues" in stopped
    shards = tmp_path / "shards"
    assert sorted(p.name for p in shards.glob("samples_*")) == [  # rounds of 2 pools: pools 0-3 done
        f"samples_{start:08d}_{start + 8:08d}.npz" for start in (0, 8, 16, 24)]
    damaged = shards / "samples_00000008_00000016.npz"
    damaged.write_bytes(damaged.read_bytes()[:-50])
    (shards / "samples_00000032_00000040.npz.tmp").write_bytes(b"torn")
    resumed = run(*command)
    assert "samples_00000008_00000016.npz: unreadable" in resumed and "24/40 samples there already" in resumed
    assert (tmp_path / "samples.npz").read_bytes() == (one / "samples.npz").read_bytes()


def test_a_sharded_checkpoint_is_refused_with_the_way_out(trained, tmp_path):
    sharded = trained / "checkpoints" / "step_00000030"
    output = run("launch/sample.py", "--weights", str(sharded), "--out", str(tmp_path), expected=2)
    assert f"python launch/checkpoint.py export-ema {sharded}" in output


def test_threshold_offset_search_keeps_the_best_offset(trained, tmp_path):
    output = run("launch/sample.py", "--weights", str(trained / "ema.safetensors"), "--out", str(tmp_path), *SAMPLE,
                 "--search-offsets=-0.2:0.2:3", "--search-samples", "30", "--digits")
    scores = {float(offset): float(score) for offset, score in
              re.findall(r"threshold offset ([-+0-9.]+): digit_fid ([0-9.]+)", output)}
    assert sorted(scores) == [-0.2, 0.0, 0.2]
    assert json.loads((tmp_path / "sampling.json").read_text())["threshold_offset"] == min(scores, key=scores.get)


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, images, labels)
    return path


def real_digits_npz(path: Path) -> Path:
    images, labels = load_digits_images()
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return write_npz(path, pixels, labels.numpy())


def test_evaluate_scores_real_digits_as_real(tmp_path):
    output = launch_tool("evaluate", str(real_digits_npz(tmp_path / "real.npz")), "--digits")
    scores = json.loads(output.strip().splitlines()[-1])
    assert scores["num_images"] == 1797 and scores["digit_accuracy"] > 0.97 and scores["digit_fid"] < 5


class StandInInception(torch.nn.Module):
    """The interface of an Inception network file, with features anyone can recompute."""

    def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        means = images.float().mean(dim=(2, 3)) / 255
        features = torch.cat([means, means.square()], dim=1)
        return features if return_features else torch.softmax(4 * features, dim=1)


def test_evaluate_computes_fid_and_inception_score_from_a_network_file(tmp_path):
    network = tmp_path / "inception.pt"
    torch.jit.script(StandInInception()).save(str(network))
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)
    fake = (rng.integers(0, 200, (200, 16, 16, 3))).astype(np.uint8)
    labels = np.zeros(len(fake), dtype=np.int64)
    launch_tool("evaluate", str(write_npz(tmp_path / "real.npz", real, labels[:1])), "--inception", str(network),
                "--write-reference", str(tmp_path / "ref.npz"))
    output = launch_tool("evaluate", str(write_npz(tmp_path / "fake.npz", fake, labels)), "--inception",
                         str(network), "--reference", str(tmp_path / "ref.npz"))
    scores = json.loads(output.strip().splitlines()[-1])
    net = StandInInception()
    features = {name: net(torch.from_numpy(x).permute(0, 3, 1, 2)).double().numpy() for name, x in
                (("real", real), ("fake", fake))}
    expected_fid = frechet_distance(*feature_statistics(features["fake"]), *feature_statistics(features["real"]))
    probabilities = net(torch.from_numpy(fake).permute(0, 3, 1, 2), return_features=False).double().numpy()
    assert scores["fid"] == pytest.approx(expected_fid, rel=1e-6) and scores["fid"] > 0
    assert scores["inception_score"] == pytest.approx(inception_score(probabilities), rel=1e-6)


def test_ddpm_checkpoint_samples_with_the_sampler_asked_for(runtime, tmp_path):
    # The run's end-of-run grid drew with DDPM's default sampler (ancestral); sample.py takes DDIM when asked.
    weights = train_and_export_ema(runtime, "configs/digits_diffmoe_e4_ddpm.yaml", tmp_path, steps=10)
    run("launch/sample.py", "--weights", str(weights), "--out", str(tmp_path / "ddim"), "--num-samples", "20",
        "--steps", "4", "--sampler", "ddim")
    images, labels = samples(tmp_path / "ddim")
    assert images.shape == (20, 8, 8, 1) and len(np.unique(images.reshape(20, -1), axis=0)) == 20
    assert json.loads((tmp_path / "ddim" / "sampling.json").read_text())["sampler"] == "ddim"
