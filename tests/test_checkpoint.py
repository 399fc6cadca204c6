"""Long runs: a run killed or preempted and resumed equals a straight run bit for bit; damaged
checkpoints are skipped, each with its problem named, and never deleted; config changes are checked;
retention keeps what it should."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffmoe_scale.config import ConfigError
from diffmoe_scale.train import checkpoint
from diffmoe_scale.train.checkpoint import MANIFEST, find_resumable, make_room_for, prune, verify
from diffmoe_scale.train.stop import EXIT_PREEMPTED
from tests.helpers import FAKE_LAYOUT, NARROW, clean_env, launch_tool, read_metrics, write_fake_checkpoint

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
CONFIG = "configs/digits_diffmoe_e4_flow.yaml"
STEPS = 12
COMMON = ["train.global_batch_size=32", f"train.max_steps={STEPS}", "logging.every_steps=1",
          "checkpoint.every_steps=4", "checkpoint.keep_last=5", "sample.steps=2", "sample.per_class=1"]
# Metrics that a run's numbers decide (not its clock).
DETERMINED = ("loss", "predictor_loss", "grad_norm", "lr", "c_avg", "capacity")


def command(out_dir: Path, *overrides: str, nproc: int = 1, resume: tuple = ()) -> list[str]:
    train = ["pretrain_diffmoe.py", "--config", CONFIG, *resume]
    for override in (*COMMON, f"train.out_dir={out_dir}", *overrides):
        train += ["--set", override]
    if nproc == 1:
        return [sys.executable, *train]
    return [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), *train]


def start(cmd: list[str], fault: str | None = None) -> subprocess.Popen:
    """`fault`: a DIFFMOE_FAULT (train/faults.py), e.g. "sigkill@step:7": every rank fails there."""
    env = clean_env() | ({"DIFFMOE_FAULT": fault} if fault else {})
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, expected: int = 0) -> str:
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == expected, f"exit {proc.returncode}, expected {expected}:\n{output[-5000:]}"
    return output


def run(cmd: list[str], expected: int = 0, fault: str | None = None) -> str:
    return finish(start(cmd, fault), expected)


def killed(cmd: list[str], fault: str) -> None:
    """Run `cmd` until `fault` (a SIGKILL) ends every rank, as a crash of the whole job would."""
    proc = start(cmd, fault)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode != 0, output[-3000:]


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in every file of a checkpoint, keyed by file and position."""
    found = {}

    def collect(prefix, value):
        if isinstance(value, torch.Tensor):
            found[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                collect(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                collect(f"{prefix}/{i}", item)

    for file in sorted(path.glob("*.pt")):
        collect(file.name, torch.load(file, weights_only=False))
    return found


def assert_same_run(ours: Path, straight: Path) -> None:
    """Step-by-step metrics and every tensor of the final checkpoint (weights, EMA, optimizer, RNG) equal."""
    assert_same_steps(read_metrics(ours), read_metrics(straight), STEPS)
    final = f"checkpoints/step_{STEPS:08d}"
    assert_same_checkpoint(ours / final, straight / final)


def assert_same_steps(ours: list[dict], straight: list[dict], steps: int) -> None:
    assert [r["step"] for r in ours] == list(range(1, steps + 1))
    for mine, theirs in zip(ours, straight):
        for key in DETERMINED:
            assert mine.get(key) == theirs.get(key), f"step {mine['step']}: {key} {mine.get(key)} != {theirs.get(key)}"


def assert_same_checkpoint(ours: Path, straight: Path) -> None:
    mine, theirs = checkpoint_tensors(ours), checkpoint_tensors(straight)
    assert mine.keys() == theirs.keys()
    different = [key for key in mine if not torch.equal(mine[key], theirs[key])]
    assert not different, f"{len(different)} of {len(mine)} tensors differ, e.g. {different[:5]}"


def resumed_step(output: str) -> int:
    return int(output.split(" at step ")[1].split()[0])


def train_here(runtime, out_dir: Path, *overrides: str, resume: str = "auto", allow: tuple = (),
               expected: int = 0) -> None:
    """The trainer in this process, as `pretrain_diffmoe.py` runs it on one process (its config errors raised)."""
    from diffmoe_scale.config import load_config
    from diffmoe_scale.train.trainer import Trainer

    config = load_config(REPO / CONFIG, [*COMMON, f"train.out_dir={out_dir}", *overrides])
    assert Trainer(config, runtime).train(resume, allow) == expected


@pytest.fixture(scope="module")
def straight(runtime, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train_here(runtime, out)
    return out


EP2_ZERO1 = ("parallel.ep=2", "parallel.zero_stage=1")
EP2_ZERO1_BF16 = (*EP2_ZERO1, "train.precision=bf16", *NARROW)


@pytest.fixture(scope="module")
def straight_ep2(tmp_path_factory):
    """A straight run on two ranks, EP=2 and ZeRO 1."""
    out = tmp_path_factory.mktemp("straight_ep2")
    run(command(out, *EP2_ZERO1, nproc=2))
    return out


@pytest.mark.slow
def test_a_run_interrupted_in_every_way_in_turn_equals_a_straight_run(runtime, straight, tmp_path, capsys,
                                                                      monkeypatch):
    """One run, stopped four times and rerun each time: a preemption notice (SIGUSR1) and SIGTERM (scancel)
    each save at the next step boundary and exit 75; SIGKILL between checkpoints loses the steps since the
    newest; SIGKILL in the middle of a save (its files written, its manifest not) leaves that checkpoint
    unused. Each rerun resumes from the newest complete checkpoint, and in the end every step's metrics and
    every tensor of the final checkpoint equal those of a run that was never stopped. The runs a signal
    stops and the last one run in this process; the killed ones in their own."""
    checkpoints = tmp_path / "checkpoints"
    monkeypatch.setenv("DIFFMOE_FAULT", "SIGUSR1@step:3")
    train_here(runtime, tmp_path, expected=EXIT_PREEMPTED)
    assert "stopped at step 3;" in capsys.readouterr().out
    assert [p.name for p in checkpoints.glob("step_*")] == ["step_00000003"]  # the stop's own save
    monkeypatch.setenv("DIFFMOE_FAULT", "SIGTERM@step:5")
    train_here(runtime, tmp_path, expected=EXIT_PREEMPTED)
    output = capsys.readouterr().out
    assert resumed_step(output) == 3 and "stopped at step 5;" in output
    assert (checkpoints / "step_00000005" / MANIFEST).is_file()
    monkeypatch.delenv("DIFFMOE_FAULT")
    assert resumed_step(run(command(tmp_path), -signal.SIGKILL, fault="sigkill@step:7")) == 5
    assert resumed_step(run(command(tmp_path), -signal.SIGKILL, fault="sigkill@save:8")) == 5
    assert not (checkpoints / "step_00000008" / MANIFEST).exists()
    train_here(runtime, tmp_path)
    assert resumed_step(capsys.readouterr().out) == 5
    assert_same_run(tmp_path, straight)


@pytest.mark.slow
def test_sigkill_and_resume_equals_straight_run_with_ep2_zero1_bf16(tmp_path):
    """The production layout (EP, ZeRO 1, bf16 with fp32 masters, sharded EMA) killed between checkpoints. Up to
    its kill the run is a straight run: its step-8 checkpoint, set aside, is what the rerun from step 4 must
    write again."""
    killed(command(tmp_path, *EP2_ZERO1_BF16, nproc=2), "sigkill@step:10")
    straight_metrics = [r for r in read_metrics(tmp_path) if r["step"] <= 8]
    straight_checkpoint = tmp_path / "straight_step_8"
    (tmp_path / "checkpoints" / "step_00000008").rename(straight_checkpoint)
    output = run(command(tmp_path, *EP2_ZERO1_BF16, "train.max_steps=8", nproc=2))
    assert resumed_step(output) == 4
    assert_same_steps(read_metrics(tmp_path), straight_metrics, 8)
    assert_same_checkpoint(tmp_path / "checkpoints" / "step_00000008", straight_checkpoint)


@pytest.mark.slow
def test_truncated_newest_checkpoint_is_skipped_for_the_previous(runtime, straight, tmp_path, capsys):
    killed(command(tmp_path), "sigkill@step:9")
    damaged = tmp_path / "checkpoints" / "step_00000008"
    optimizer_file = next(damaged.glob("*optim_states.pt"))
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=rf"--resume {damaged}: 1 file\(s\) differ from its manifest, "
                                          rf"e.g. {optimizer_file.name}: 1000 bytes"):
        train_here(runtime, tmp_path, resume=str(damaged))
    capsys.readouterr()
    train_here(runtime, tmp_path)
    output = capsys.readouterr().out
    assert f"warning: skipping checkpoint {damaged}" in output and optimizer_file.name in output
    assert resumed_step(output) == 4
    assert_same_run(tmp_path, straight)


def test_config_changes_on_resume(runtime, tmp_path, capsys):
    # A changed model shape is refused, naming the key...
    train_here(runtime, tmp_path, "train.max_steps=8")
    with pytest.raises(ConfigError, match="cannot continue with model.depth: 6 -> 4"):
        train_here(runtime, tmp_path, "model.depth=4")
    # ...a changed lr and max_steps are applied and reported.
    capsys.readouterr()
    train_here(runtime, tmp_path, "train.max_steps=10", "optim.lr=5e-4")
    assert "resuming with a changed config: optim.lr: 0.001 -> 0.0005; train.max_steps: 8 -> 10" in capsys.readouterr().out
    assert [r["lr"] for r in read_metrics(tmp_path)][8:] == [5e-4 * min(1.0, (s + 1) / 100) for s in (9, 10)]


def test_a_change_of_training_maths_is_refused_unless_allowed(runtime, tmp_path, capsys):
    tiny = ("train.max_steps=4", "checkpoint.every_steps=0")
    train_here(runtime, tmp_path, *tiny)
    assert "token pool 512 tokens (ep_group: 32 images x 16 tokens)" in capsys.readouterr().out  # the header line
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    changed = ("train.max_steps=6", "checkpoint.every_steps=0", "moe.capacity=2.0", "train.grad_accum_steps=2")
    with pytest.raises(ConfigError) as refused:
        train_here(runtime, tmp_path, *changed)
    checkpoint = tmp_path / "checkpoints" / "step_00000004"
    assert str(refused.value) == (
        f"checkpoint {checkpoint} was trained with other training maths: moe.capacity: 1.0 -> 2.0; "
        f"train.grad_accum_steps: 1 -> 2; pool_tokens: 512 -> 256. Resume with its values, or accept the change "
        f"with --allow-change moe.capacity --allow-change train.grad_accum_steps --allow-change pool_tokens")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written
    capsys.readouterr()
    train_here(runtime, tmp_path, *changed, allow=("moe.capacity", "train.grad_accum_steps", "pool_tokens"))
    output = capsys.readouterr().out
    assert ("resuming with changed training maths, allowed by --allow-change: moe.capacity: 1.0 -> 2.0; "
            "train.grad_accum_steps: 1 -> 2; pool_tokens: 512 -> 256") in output
    assert "resuming with a changed config: train.max_steps: 4 -> 6" in output
    assert "token pool 256 tokens (ep_group: 16 images x 16 tokens)" in output
    assert resumed_step(output) == 4 and [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 7))
    manifest = json.loads((tmp_path / "checkpoints" / "step_00000006" / MANIFEST).read_text())
    assert (manifest["config"]["moe"]["capacity"], manifest["config"]["train"]["grad_accum_steps"]) == (2.0, 2)


def test_no_resume_sets_old_checkpoints_and_metrics_aside(runtime, tmp_path, capsys):
    train_here(runtime, tmp_path, "train.max_steps=8", "optim.lr=5e-4")
    capsys.readouterr()
    train_here(runtime, tmp_path, "train.max_steps=8", resume="none")
    output = capsys.readouterr().out
    assert "starting fresh; the existing checkpoints were moved to" in output
    aside = list(tmp_path.glob("checkpoints.set-aside-*"))
    assert len(aside) == 1 and (aside[0] / "step_00000008" / MANIFEST).is_file()
    assert (tmp_path / "checkpoints" / "step_00000008" / MANIFEST).is_file()
    old_metrics = list(tmp_path.glob("metrics.jsonl.set-aside-*"))
    assert len(old_metrics) == 1
    assert f"the existing {tmp_path / 'metrics.jsonl'} was moved to {old_metrics[0]}" in output
    old_lrs = [json.loads(line)["lr"] for line in old_metrics[0].read_text().splitlines()]
    assert old_lrs == [pytest.approx(5e-4 * (step + 1) / 100) for step in range(1, 9)]  # the first run's records
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))


def unreadable(monkeypatch, errors: dict[Path, int]) -> None:
    """checkpoint.py's open() fails with errors[path] for each path and everything under it, as it does for
    a reader without permission or on a failing disk (the tests may run as root, whom file modes do not stop)."""
    real_open = open

    def guarded_open(file, *args, **kwargs):
        for path, code in errors.items():
            if Path(file) == path or path in Path(file).parents:
                raise OSError(code, os.strerror(code), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", guarded_open, raising=False)


def test_each_verification_problem_is_named(tmp_path, monkeypatch):
    unfinished = write_fake_checkpoint(tmp_path, 1, complete=False)
    empty, not_json, a_list, bad_entry, differs, bad_file, bad_manifest, bad_dir = (
        write_fake_checkpoint(tmp_path, step) for step in range(2, 10))
    (empty / MANIFEST).write_text("{}")
    (not_json / MANIFEST).write_text('{"kind": "shar')
    (a_list / MANIFEST).write_text("[1, 2]")
    manifest = json.loads((bad_entry / MANIFEST).read_text())
    (bad_entry / MANIFEST).write_text(json.dumps({**manifest, "files": {"weights.pt": "abc"}}))
    (differs / "weights.pt").write_bytes(b"short")
    unreadable(monkeypatch, {bad_file / "weights.pt": errno.EIO, bad_manifest / MANIFEST: errno.EACCES,
                             bad_dir: errno.EACCES})
    assert verify(unfinished)[1] == "no manifest.json (its save did not finish)"
    assert verify(empty)[1] == "manifest.json is malformed: no 'kind'"
    assert verify(not_json)[1].startswith("manifest.json is not JSON (Unterminated string")
    assert verify(a_list)[1] == "manifest.json is malformed: a JSON list, not an object"
    assert verify(bad_entry)[1] == ("manifest.json is malformed: the entry of weights.pt in 'files' is not "
                                    "[size, sha256]")
    assert verify(differs)[1].startswith("1 file(s) differ from its manifest, e.g. weights.pt: 5 bytes")
    assert verify(bad_file)[1] == "1 file(s) unreadable, e.g. weights.pt: Input/output error"
    assert verify(bad_manifest)[1] == "manifest.json unreadable (Permission denied)"
    assert verify(bad_dir)[1] == "manifest.json unreadable (Permission denied)"


def test_auto_resume_refuses_unless_every_checkpoint_verifies_or_none_was_ever_completed(tmp_path, monkeypatch):
    unfinished = write_fake_checkpoint(tmp_path, 16, complete=False)
    assert find_resumable(tmp_path, FAKE_LAYOUT) is None  # killed in its first save: nothing was ever complete
    (tmp_path / "latest").write_text("step_00000008\n")  # ... but here one was, and is gone now
    with pytest.raises(ConfigError, match=r"none of its 1 checkpoints can be resumed: step_00000016: no manifest"):
        find_resumable(tmp_path, FAKE_LAYOUT)
    (tmp_path / "latest").unlink()
    empty = write_fake_checkpoint(tmp_path, 8)
    (empty / MANIFEST).write_text("{}")
    unreadable(monkeypatch, {write_fake_checkpoint(tmp_path, 4): errno.EACCES})
    with pytest.raises(ConfigError) as refused:
        find_resumable(tmp_path, FAKE_LAYOUT)
    assert str(refused.value).startswith(
        f"{tmp_path}: none of its 3 checkpoints can be resumed: {unfinished.name}: no manifest.json (its save did "
        f"not finish); step_00000008: manifest.json is malformed: no 'kind'; step_00000004: manifest.json "
        f"unreadable (Permission denied). ")
    assert "--no-resume" in str(refused.value)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000008", "step_00000016"]


def test_retention_and_the_same_step_cleanup_delete_only_what_they_can_read(tmp_path, monkeypatch):
    unreadable_old, *_ = (write_fake_checkpoint(tmp_path, step) for step in (100, 200, 300))
    unreadable(monkeypatch, {unreadable_old: errno.EACCES})
    assert prune(tmp_path, keep_last=1, keep_every=0) == [tmp_path / "step_00000200"]
    assert unreadable_old.is_dir()
    # Before a save into step_<n>: an unfinished save is deleted, anything else is set aside.
    unfinished = write_fake_checkpoint(tmp_path, 400, complete=False)
    make_room_for(unfinished)
    make_room_for(tmp_path / "step_00000300")
    make_room_for(unreadable_old)
    assert not unfinished.exists()
    assert sorted(p.name.split(".set-aside-")[0] for p in tmp_path.glob("*.set-aside-*")) == [
        "step_00000100", "step_00000300"]
    assert checkpoint.list_checkpoints(tmp_path) == []


@pytest.mark.slow
def test_two_data_parallel_ranks_write_the_state_once(runtime, straight_ep2, tmp_path):
    """The EMA is sharded as ZeRO shards the optimizer state: an EP=2 checkpoint on two data-parallel ranks
    writes at most 1.05x the bytes of one process's checkpoint of the same model at the same ZeRO stage (every
    rank wrote a whole EMA before). Its bit-exact resume: test_sigkill_and_resume_equals_straight_run_with_ep2."""
    one = tmp_path / "one"
    train_here(runtime, one, *EP2_ZERO1[1:], "train.max_steps=8")

    def written(run_dir: Path) -> int:
        manifest = json.loads((run_dir / "checkpoints" / "step_00000008" / MANIFEST).read_text())
        return sum(size for size, _ in manifest["files"].values())

    assert written(straight_ep2) <= 1.05 * written(one)


def test_a_write_that_fails_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.atomic_torch_save({"step": 1}, path)

    def full_disk(file):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        checkpoint._atomic_write(path, full_disk)
    assert torch.load(path)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_flipped_byte_and_missing_manifest_make_a_checkpoint_unusable(tmp_path):
    older, newer = write_fake_checkpoint(tmp_path, 8), write_fake_checkpoint(tmp_path, 16)
    write_fake_checkpoint(tmp_path, 24, complete=False)  # died while saving
    assert verify(newer) == (json.loads((newer / MANIFEST).read_text()), None)
    data = bytearray((newer / "weights.pt").read_bytes())
    data[10] ^= 1
    (newer / "weights.pt").write_bytes(bytes(data))
    assert "weights.pt" in verify(newer)[1]
    path, _ = find_resumable(tmp_path, FAKE_LAYOUT)
    assert path == older


def test_retention_deletes_dead_unfinished_saves_and_the_consolidated_copies_of_what_it_deletes(tmp_path, monkeypatch):
    for step in (100, 200, 300, 400):
        write_fake_checkpoint(tmp_path, step)
    copies = {step: write_fake_checkpoint(tmp_path, step, consolidated=True) for step in (100, 400)}
    unfinished_copy = write_fake_checkpoint(tmp_path, 200, complete=False, consolidated=True)  # may be being written
    dead = write_fake_checkpoint(tmp_path, 250, complete=False)  # a save that died before the one of step 300
    unreadable_dead = write_fake_checkpoint(tmp_path, 150, complete=False)
    unreadable(monkeypatch, {unreadable_dead: errno.EACCES})
    newest_unfinished = write_fake_checkpoint(tmp_path, 500, complete=False)  # newer than every complete one
    deleted = prune(tmp_path, keep_last=2, keep_every=0)
    assert sorted(p.name for p in deleted) == ["step_00000100", "step_00000100_consolidated", "step_00000200",
                                                "step_00000250"]
    assert not dead.exists() and not copies[100].exists()
    for kept in (copies[400], unfinished_copy, unreadable_dead, newest_unfinished, tmp_path / "step_00000300"):
        assert kept.is_dir(), kept
    # With no complete checkpoint, nothing tells a dead save from the first one still being written.
    empty = tmp_path / "other"
    first = write_fake_checkpoint(empty, 8, complete=False)
    assert prune(empty, keep_last=1, keep_every=0) == [] and first.is_dir()


def test_retention_keeps_the_last_k_and_every_m(tmp_path):
    for step in range(100, 1100, 100):
        write_fake_checkpoint(tmp_path, step)
    write_fake_checkpoint(tmp_path, 1100, complete=False)
    deleted = prune(tmp_path, keep_last=2, keep_every=500)
    left = sorted(int(p.name[5:]) for p in tmp_path.glob("step_*"))
    assert left == [500, 900, 1000, 1100]
    assert len(deleted) == 7


def assert_continues(ours: Path, straight: Path, from_step: int) -> None:
    """The resumed steps' losses equal the straight run's up to float summation order."""
    mine = [r for r in read_metrics(ours) if r["step"] > from_step]
    theirs = [r for r in read_metrics(straight) if r["step"] > from_step]
    assert [r["step"] for r in mine] == list(range(from_step + 1, STEPS + 1))
    for a, b in zip(mine, theirs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), f"step {a['step']}"
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), f"step {a['step']}"


@pytest.mark.slow
def test_ep2_zero1_checkpoint_resumes_on_one_process_after_consolidation(runtime, straight_ep2, tmp_path,
                                                                         capsys):
    sharded = tmp_path / "checkpoints" / "step_00000008"
    shutil.copytree(straight_ep2 / "checkpoints" / sharded.name, sharded)  # a run directory that has reached step 8
    with pytest.raises(ConfigError, match=f"python launch/checkpoint.py consolidate {sharded}"):
        train_here(runtime, tmp_path)
    assert "consolidated step 8" in launch_tool("checkpoint", "consolidate", str(sharded))
    capsys.readouterr()
    train_here(runtime, tmp_path)
    assert f"resumed from {sharded}_consolidated at step 8" in capsys.readouterr().out
    assert_continues(tmp_path, straight_ep2, 8)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_with_ep2_and_zero2(straight, tmp_path):
    sharded = tmp_path / "source" / "step_00000008"
    shutil.copytree(straight / "checkpoints" / sharded.name, sharded)
    launch_tool("checkpoint", "consolidate", str(sharded))
    # A new run directory started from another run's checkpoint, named explicitly.
    branch = tmp_path / "branch"
    run(command(branch, "parallel.ep=2", "parallel.zero_stage=2", nproc=2,
                resume=("--resume", f"{sharded}_consolidated")))
    assert_continues(branch, straight, 8)


@pytest.mark.slow
def test_tp2_checkpoint_resumes_on_one_process_after_consolidation(runtime, straight, tmp_path):
    run(command(tmp_path, "parallel.tp=2", "train.max_steps=8", nproc=2))
    launch_tool("checkpoint", "consolidate", str(tmp_path / "checkpoints" / "step_00000008"))
    train_here(runtime, tmp_path)
    assert_continues(tmp_path, straight, 8)


@pytest.mark.slow
def test_export_ema_gathers_every_shard_into_the_plain_model(straight_ep2, tmp_path):
    from safetensors.torch import load_file

    from diffmoe_scale.config import config_from_dict
    from diffmoe_scale.models import build_model
    from diffmoe_scale.train.ema_thresholds import load_ema_weights

    sharded = straight_ep2 / "checkpoints" / "step_00000008"
    launch_tool("checkpoint", "export-ema", str(sharded), "--out", str(tmp_path / "ema.safetensors"))
    exported = load_file(tmp_path / "ema.safetensors")
    manifest = json.loads((sharded / MANIFEST).read_text())
    model = build_model(config_from_dict(manifest["config"], "manifest"))
    load_ema_weights(model, exported, "copy")  # every tensor but the averaged thresholds, strictly
    assert sorted(name for name in exported if name not in model.state_dict()) == [
        f"blocks.{block}.ffn.thresholds.average" for block in (1, 3, 5)]
    # The EMA is sharded as the fp32 masters: each rank holds two of the four experts of each layer, and its
    # half of ZeRO's flat partition of the dense parameters (which cuts one of them in two). The export puts
    # the pieces back together in order.
    shards = [torch.load(sharded / f"trainer_rank_{r:05d}.pt", weights_only=False)["ema"] for r in (0, 1)]

    def pieces(name: str) -> list[tuple[int, torch.Tensor]]:
        """(start, values) of each non-empty piece of parameter `name`, rank 0's first."""
        found = []
        for state in shards:
            i = state["names"].index(name)
            if state["shadow"][i].numel():
                found.append((state["starts"][i], state["shadow"][i]))
        return found

    experts = torch.cat([values for _, values in pieces("blocks.1.ffn.deepspeed_moe.experts.w1")])
    assert torch.equal(exported["blocks.1.ffn.experts.w1"].flatten(), experts)
    dense = [name for name in shards[0]["names"] if ".experts." not in name]
    cut = [name for name in dense if len(pieces(name)) == 2]
    assert len(cut) == 1 and pieces(cut[0])[0][0] == 0 < pieces(cut[0])[1][0], cut
    for name in dense:
        parts = pieces(name)
        assert [start for start, _ in parts] == [sum(len(values) for _, values in parts[:i]) for i in range(len(parts))]
        assert torch.equal(exported[checkpoint.plain_name(name)].flatten(),
                           torch.cat([values for _, values in parts])), name


def test_inspect_lists_checkpoints_and_names_each_problem(tmp_path):
    write_fake_checkpoint(tmp_path, 8)
    damaged = write_fake_checkpoint(tmp_path, 16)
    (damaged / "weights.pt").write_bytes(b"short")
    empty = write_fake_checkpoint(tmp_path, 24)
    (empty / MANIFEST).write_text("{}")
    unfinished = write_fake_checkpoint(tmp_path, 32, complete=False)
    result = subprocess.run([sys.executable, "launch/checkpoint.py", "inspect", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, env=clean_env())
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{damaged}: UNUSABLE: 1 file(s) differ from its manifest, e.g. weights.pt: 5 bytes" in result.stdout
    assert f"{empty}: UNUSABLE: manifest.json is malformed: no 'kind'" in result.stdout
    assert f"{unfinished}: UNUSABLE: no manifest.json (its save did not finish)" in result.stdout
    assert f"{tmp_path / 'step_00000008'}: sharded, step 8" in result.stdout


def test_auto_resume_over_unverifiable_checkpoints_is_refused_and_changes_nothing(runtime, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    empty, damaged = write_fake_checkpoint(checkpoints, 8), write_fake_checkpoint(checkpoints, 16)
    (empty / MANIFEST).write_text("{}")
    (damaged / "weights.pt").write_bytes(b"short")
    (checkpoints / "latest").write_text("step_00000016\n")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 17)))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as refused:
        train_here(runtime, tmp_path, "train.max_steps=4")
    assert str(refused.value).startswith(f"{checkpoints}: none of its 2 checkpoints can be resumed: step_00000016: "
                                         f"1 file(s) differ from its manifest, e.g. weights.pt: 5 bytes")
    assert "step_00000008: manifest.json is malformed: no 'kind'" in str(refused.value)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
