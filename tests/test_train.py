"""The trainer end to end: every FFN kind learns on digits; the README command writes its outputs."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffmoe_scale.config import load_config
from tests.helpers import NARROW, clean_env, read_metrics

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIGS = {
    "dense": "configs/digits_dense_flow.yaml",
    "token_choice": "configs/digits_token_choice_e4_flow.yaml",
    "expert_choice": "configs/digits_expert_choice_e4_flow.yaml",
    "diffmoe": "configs/digits_diffmoe_e4_flow.yaml",
    "diffmoe_ddpm": "configs/digits_diffmoe_e4_ddpm.yaml",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", DIGITS_CONFIGS)
def test_each_ffn_kind_learns_digits(kind, runtime, tmp_path):
    from diffmoe_scale.train.trainer import Trainer

    steps = 30  # with a 10-step warmup the loss falls ~30% by then (the configs' 100-step warmup needs ~60)
    config = load_config(REPO / DIGITS_CONFIGS[kind], [
        f"train.max_steps={steps}", "optim.warmup_steps=10", "logging.every_steps=1", f"train.out_dir={tmp_path}",
        "train.global_batch_size=64", "sample.steps=4", "sample.per_class=1",
    ])
    assert Trainer(config, runtime).train() == 0
    losses = [record["loss"] for record in read_metrics(tmp_path)]
    assert len(losses) == steps
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, f"{kind}: loss did not fall: first 10 steps {first:.3f}, last 10 {last:.3f}"
    assert all(record["grad_norm"] > 0 for record in read_metrics(tmp_path))
    assert (tmp_path / "samples.png").is_file()


def run_cli(*args):
    return subprocess.run([sys.executable, "pretrain_diffmoe.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=clean_env())


@pytest.mark.slow
def test_readme_default_command_writes_metrics_config_and_samples(tmp_path):
    result = run_cli("--config", "configs/digits_diffmoe_e4_flow.yaml", "--set", "train.max_steps=4",
                     "--set", "logging.every_steps=2", "--set", f"train.out_dir={tmp_path}",
                     "--set", "train.peak_tflops=0.5", "--set", "sample.steps=4")  # the grid as 50 steps draw it
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step 4/4" in result.stdout and "TFLOP/s/dev, MFU " in result.stdout

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    for key in ("step", "loss", "lr", "grad_norm", "c_avg", "images_per_s", "tokens_per_s", "predictor_loss",
                "capacity", "peak_memory_mb", "all_to_all_mb"):
        assert key in records[-1], key
    assert records[-1]["grad_norm"] > 0
    last = records[-1]  # efficiency: FLOPs counted once, TFLOP/s and MFU from the window's step time
    assert last["tflops_per_device"] == pytest.approx(last["model_tflop_per_step"] / last["step_time_s"])
    assert last["mfu"] == pytest.approx(last["tflops_per_device"] / 0.5)
    assert set(last["phase_s"]) == {"data", "forward", "backward", "optimizer", "all_to_all"}
    assert all(last["phase_s"][phase] > 0 for phase in ("data", "forward", "backward", "optimizer"))
    assert sum(last["phase_s"].values()) < 2 * last["step_time_s"] * 2  # one timed step of a 2-step window
    assert len(records[-1]["capacity"]) == 3 and len(records[-1]["capacity"][0]) == 4  # 3 MoE layers x 4 experts

    resolved = load_config(tmp_path / "config.yaml")
    assert resolved.train.max_steps == 4 and resolved.moe.pool == "ep_group"

    grid = Image.open(tmp_path / "samples.png")
    per_class = resolved.sample.per_class
    assert grid.size[1] > grid.size[0] / per_class * 10 * 0.9  # one row per class: 10 rows
    assert len(set(grid.getdata())) > 10  # not a blank image


@pytest.mark.slow
def test_ctrl_c_saves_and_stops_at_a_step_boundary(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "pretrain_diffmoe.py", "--config", "configs/digits_diffmoe_e4_flow.yaml",
         "--set", "train.max_steps=100000", "--set", "logging.every_steps=2", "--set", "train.global_batch_size=32",
         "--set", f"train.out_dir={tmp_path}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(),
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-3000:]
    assert "stopped at step" in output
    assert "Traceback" not in output
    assert all(json.loads(line)["step"] % 2 == 0 for line in metrics.read_text().splitlines())
    stopped_at = int(output.split("stopped at step ")[1].split(";")[0])
    assert (tmp_path / "checkpoints" / f"step_{stopped_at:08d}" / "manifest.json").is_file()


def test_missing_latents_are_a_config_error_before_training(tmp_path):
    result = run_cli("--config", "configs/digits_diffmoe_e4_flow.yaml", "--set", "data.dataset=latents",
                     "--set", "data.path=/nonexistent", "--set", f"train.out_dir={tmp_path}")
    assert result.returncode == 2
    assert "config error" in result.stderr and "data.path: /nonexistent holds no readable index.json" in result.stderr
    assert "launch/extract_latents.py" in result.stderr


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_and_keeps_its_id_across_a_resume(runtime, tmp_path):
    from diffmoe_scale.train.trainer import Trainer
    from tests.helpers import wandb_records

    common = ["logging.wandb=true", "logging.every_steps=5", "checkpoint.every_steps=10", f"train.out_dir={tmp_path}",
              "train.global_batch_size=32", "sample.steps=2", "sample.per_class=1"]
    for steps in (10, 20):
        config = load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", [*common, f"train.max_steps={steps}"])
        assert Trainer(config, runtime).train() == 0
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({run.name.rsplit("-", 1)[1] for run in runs}) == 1  # one id, two starts
    histories = [[r.history for r in wandb_records(next(run.glob("run-*.wandb"))) if r.HasField("history")]
                 for run in runs]
    assert [[h.step.num for h in history] for history in histories] == [[5, 10], [15, 20]]
    items = [(item.key or "/".join(item.nested_key), item.value_json)
             for history in histories for h in history for item in h.item]
    keys = {key for key, _ in items}
    assert {"loss", "predictor_loss", "grad_norm", "lr", "c_avg", "images_per_s", "tokens_per_s", "peak_memory_mb",
            "capacity/layer0/expert0", "capacity/layer2/expert3"} <= keys
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [float(value) for key, value in items if key == "loss"] == losses


@pytest.mark.slow
def test_plot_draws_losses_and_capacities_from_a_run(trained, tmp_path):
    records = read_metrics(trained)
    assert len(records[-1]["capacity_by_noise"]) == 10 and len(records[-1]["capacity_by_class"]) == 10
    assert all(value is None or 0 < value <= 4 for value in records[-1]["capacity_by_noise"])
    result = subprocess.run([sys.executable, "launch/plot.py", str(trained), "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, env=clean_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("loss.png", "capacity_heatmap.png", "capacity_by_condition.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 300
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # drawn, not blank


def test_plot_refuses_a_directory_without_metrics(tmp_path):
    result = subprocess.run([sys.executable, "launch/plot.py", str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, env=clean_env(), timeout=300)
    assert result.returncode == 2 and "no metrics" in result.stderr


def poison_steps(trainer, bad_steps: set) -> None:
    """Make the diffusion loss NaN in the steps numbered `bad_steps` (1-based, as logged)."""
    training_losses = trainer.objective.training_losses

    def losses(*args):
        result = training_losses(*args)
        if trainer.step + 1 in bad_steps:
            result["diffusion"] = result["diffusion"] * float("nan")
        return result

    trainer.objective.training_losses = losses


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (1, "fp32"), (1, "bf16"), (2, "bf16")],
                         ids=["own-clipping", "zero1", "zero1-bf16", "zero2-bf16"])
def test_nan_steps_are_skipped_and_a_streak_saves_and_stops(zero_stage, precision, runtime, tmp_path):
    """Each optimizer path: torch's AdamW without ZeRO (we drop the gradients), DeepSpeed's ZeRO optimizer,
    its BF16_Optimizer (ZeRO 1 in bf16) and ZeRO 2 in bf16 (DeepSpeed skips the update on the norm we check)."""
    from diffmoe_scale.parallel.consolidate import _torch_optimizer
    from diffmoe_scale.train.trainer import EXIT_UNHEALTHY, Trainer

    config = load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", [
        "train.max_steps=30", "logging.every_steps=1", f"train.out_dir={tmp_path}", "train.global_batch_size=32",
        f"parallel.zero_stage={zero_stage}", f"train.precision={precision}", "train.max_nonfinite_steps=3",
        "checkpoint.every_steps=0", *NARROW])
    trainer = Trainer(config, runtime)
    poison_steps(trainer, {4, 5} | set(range(10, 31)))
    snapshots = {}  # after steps 3, 5 and 9: NaN steps 4 and 5 must change nothing, steps 6 to 9 must
    train_step = trainer.train_step

    optimizer = _torch_optimizer(trainer.engine)

    def train_step_with_snapshots():
        if trainer.step in (3, 5, 9):
            adam = [value for state in optimizer.state.values() for value in state.values()]  # moments and step
            snapshots[trainer.step] = [t.detach().clone() for t in (*trainer.model.parameters(),
                                                                   *trainer.model.buffers(),
                                                                   *trainer.ema.shadow, *adam,
                                                                   torch.tensor(trainer.scheduler.last_epoch))]
        return train_step()

    trainer.train_step = train_step_with_snapshots
    assert trainer.train() == EXIT_UNHEALTHY
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[5], strict=True))
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    assert sorted(records) == list(range(1, 12))  # the third NaN step in a row (12) stops the run before logging
    assert [records[s]["skipped_steps"] for s in (3, 4, 5, 9, 11)] == [0, 1, 2, 2, 4]
    assert all(math.isfinite(records[s]["loss"]) for s in (6, 7, 8, 9))
    assert not torch.equal(snapshots[5][0], snapshots[9][0])  # healthy steps after the skips were applied
    assert (tmp_path / "checkpoints" / "step_00000012" / "manifest.json").is_file()
    assert trainer.health.skipped_steps == 5 and trainer.health.in_a_row == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("zero_stage", [0, 1], ids=["own-clipping", "zero1"])
def test_a_step_with_a_finite_loss_and_an_infinite_gradient_is_skipped(zero_stage, runtime, tmp_path):
    """Gradients that overflow while the loss stays finite (reduced precision's failure): the norm decides."""
    from diffmoe_scale.train.trainer import Trainer

    config = load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", [
        "train.max_steps=4", "logging.every_steps=1", f"train.out_dir={tmp_path}", "train.global_batch_size=32",
        f"parallel.zero_stage={zero_stage}", "checkpoint.every_steps=0", *NARROW])
    trainer = Trainer(config, runtime)
    param = next(trainer.model.parameters())
    param.register_hook(lambda grad: grad * float("inf") if trainer.step + 1 == 3 else grad)
    assert trainer.train() == 0
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    assert [records[s]["skipped_steps"] for s in (2, 3, 4)] == [0, 1, 1] and math.isfinite(records[3]["loss"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
