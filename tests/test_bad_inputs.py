"""Every bad input ends with one line naming the file and the problem and exit status 2, on one rank and on
two: damaged latent shards, weights that are not safetensors, .npz files evaluate.py cannot score, a batch
that does not split over the ranks."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffmoe_scale.config import ConfigError
from diffmoe_scale.data.latents import INDEX, LABELS, LatentShardDataset, shard_name
from tests.helpers import clean_env

REPO = Path(__file__).resolve().parents[1]
COUNTS = [8, 8, 4]
TORCHRUN = [sys.executable, "launch/supervise.py", str(Path(sys.executable).parent / "torchrun"), "--standalone",
            "--nproc_per_node", "2"]


def write_latents(out: Path) -> Path:
    """What launch/extract_latents.py writes, for 20 random 4x8x8 latents of 3 classes with mirror images."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for shard, count in enumerate(COUNTS):
        np.save(out / shard_name(shard), rng.normal(size=(count, 2, 4, 8, 8)).astype(np.float16))
    np.save(out / LABELS, np.arange(sum(COUNTS)) % 3)
    index = {"format": 1, "num_images": sum(COUNTS), "latent_shape": [4, 8, 8], "flip": True,
             "classes": ["a", "b", "c"], "shards": [{"file": shard_name(k), "count": n} for k, n in enumerate(COUNTS)]}
    (out / INDEX).write_text(json.dumps(index))
    return out


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def shorten(path: Path) -> None:
    np.save(path, np.load(path)[:2])


DAMAGES = {
    "truncated shard": (lambda d: truncate(d / shard_name(1)), shard_name(1), "latent shard truncated"),
    "short shard": (lambda d: shorten(d / shard_name(2)), shard_name(2),
                    "latents of shape [2, 2, 4, 8, 8], but index.json says [4, 2, 4, 8, 8]"),
    "truncated labels": (lambda d: truncate(d / LABELS), LABELS, "labels file"),
    "labels too few": (lambda d: np.save(d / LABELS, np.zeros(5, dtype=np.int64)), LABELS,
                       "5 labels and 20 images in the shards"),
    "index without shards": (lambda d: (d / INDEX).write_text('{"num_images": 20}'), INDEX,
                             "no latent_shape, flip, classes, shards"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_latents_are_refused_at_open_naming_the_file(damage, tmp_path):
    spoil, file, problem = DAMAGES[damage]
    spoil(write_latents(tmp_path / "latents"))
    with pytest.raises(ConfigError) as refused:
        LatentShardDataset(tmp_path / "latents", hflip=True)
    assert str(refused.value).startswith(f"data.path: {tmp_path / 'latents' / file}: ") and problem in str(refused.value)


def run(command: list[str], ranks: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if ranks == 1 else TORCHRUN
    return subprocess.run([*launcher, *command], cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)


def assert_one_line_and_exit_2(result: subprocess.CompletedProcess, line_start: str, problem: str) -> None:
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.startswith(line_start)]
    assert result.returncode == 2, output[-4000:]
    assert len(lines) == 1 and problem in lines[0], output[-4000:]
    # No traceback of a rank; torchrun prints its own summary (with a traceback) for any rank exiting non-zero.
    assert output.count("Traceback") == output.count("elastic.multiprocessing.errors.ChildFailedError:"), output[-4000:]


# Each damage on one world size: what is refused is the same on any (the test above), how it ends is per size.
@pytest.mark.slow
@pytest.mark.parametrize("damage, ranks", [("truncated shard", 1), ("short shard", 2)])
def test_training_on_damaged_latents_ends_with_one_line(damage, ranks, tmp_path):
    spoil, file, problem = DAMAGES[damage]
    spoil(write_latents(tmp_path / "latents"))
    overrides = ["data.dataset=latents", f"data.path={tmp_path / 'latents'}", "model.input_size=8",
                 "model.in_channels=4", "model.num_classes=3", "train.global_batch_size=4", "train.max_steps=12",
                 f"train.out_dir={tmp_path / 'run'}", "sample.steps=2", "sample.per_class=1"]
    result = run(["pretrain_diffmoe.py", "--config", "configs/digits_diffmoe_e4_flow.yaml",
                  *[arg for override in overrides for arg in ("--set", override)]], ranks)
    assert_one_line_and_exit_2(result, f"config error: data.path: {tmp_path / 'latents' / file}: ", problem)


@pytest.mark.parametrize("ranks, accumulation", [(1, 2), (2, 1)])  # 2 micro-batches either way
def test_a_batch_that_does_not_split_into_micro_batches_ends_with_one_line(ranks, accumulation, tmp_path):
    result = run(["pretrain_diffmoe.py", "--config", "configs/digits_diffmoe_e4_flow.yaml",
                  "--set", "train.global_batch_size=33", "--set", f"train.grad_accum_steps={accumulation}",
                  "--set", f"train.out_dir={tmp_path}"], ranks)
    assert_one_line_and_exit_2(result, "config error: ", "train.global_batch_size: 33 does not split into 2")


@pytest.mark.parametrize("ranks", [1, 2])
def test_sampling_from_weights_that_are_not_safetensors_ends_with_one_line(ranks, tmp_path):
    weights = tmp_path / "ema.safetensors"
    weights.write_text("not weights")
    result = run(["launch/sample.py", "--weights", str(weights), "--out", str(tmp_path / "out")], ranks)
    assert_one_line_and_exit_2(result, f"error: {weights}: ", "not a readable safetensors file")


def npz(path: Path, *arrays) -> Path:
    np.savez(path, *arrays)
    return path


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(20) % 10
    truncated = npz(tmp_path / "truncated.npz", gray, labels)
    truncated.write_bytes(truncated.read_bytes()[:300])
    (tmp_path / "text.npz").write_text("hello")
    (tmp_path / "network.pt").write_text("not a network")
    np.save(tmp_path / "one.npy", gray)
    return {
        "gray": npz(tmp_path / "gray.npz", gray, labels),
        "float": npz(tmp_path / "float.npz", gray.astype(np.float32) / 255, labels),
        "rgb": npz(tmp_path / "rgb.npz", np.repeat(gray, 3, axis=3), labels),
        "no labels": npz(tmp_path / "no_labels.npz", gray),
        "labels out of range": npz(tmp_path / "big_labels.npz", gray, np.arange(20)),
        "truncated": truncated, "text": tmp_path / "text.npz", "missing": tmp_path / "missing.npz",
        "one array": tmp_path / "one.npy", "network": tmp_path / "network.pt",
    }


EVALUATE_CASES = {  # name: (samples, options, file the line names, problem)
    "missing": ("missing", ["--digits"], "missing", "no such file"),
    "malformed": ("text", ["--digits"], "text", "not a readable .npz file"),
    "truncated": ("truncated", ["--digits"], "truncated", "not a readable .npz file"),
    "one array": ("one array", ["--digits"], "one array", "one array, not an .npz"),
    "float": ("float", ["--digits"], "float", "arr_0 holds float32; this evaluator needs uint8"),
    "RGB for digits": ("rgb", ["--digits"], "rgb", "needs grayscale images [N, 8, 8, 1]"),
    "no labels": ("no labels", ["--digits"], "no labels", "no arr_1"),
    "labels out of range": ("labels out of range", ["--digits"], "labels out of range", "labels 0..19"),
    "grayscale for Inception": ("gray", ["--inception", "network", "--write-reference", "ref.npz"], "gray",
                                "needs RGB images [N, H, W, 3]"),
    "not a network": ("rgb", ["--inception", "network", "--write-reference", "ref.npz"], "network",
                      "not a TorchScript network file"),
}


@pytest.mark.parametrize("case", EVALUATE_CASES)
def test_evaluate_refuses_what_it_cannot_score_with_one_line(case, inputs, capsys):
    spec = importlib.util.spec_from_file_location("launch_evaluate", REPO / "launch" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    samples, options, named, problem = EVALUATE_CASES[case]
    argv = [str(inputs[samples]), *[str(inputs.get(option, option)) for option in options]]
    assert evaluate.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("error: ") and str(inputs[named]) in err and problem in err, err
