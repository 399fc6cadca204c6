"""Disk full: a save is checked against the last checkpoint's size first (retention frees room when it
safely can), and a write the file system refuses ends in one message and exit status 4, with the
previous checkpoints intact."""
import json
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from diffmoe_scale.config import load_config
from diffmoe_scale.train.checkpoint import MANIFEST, list_checkpoints, verify
from diffmoe_scale.train.disk_space import SaveFailed, ensure_room, reporting_write_errors
from tests.helpers import clean_env, write_fake_checkpoint

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_MIB = 300
Usage = namedtuple("Usage", "total used free")


def fake_checkpoints(root: Path, steps) -> None:
    """Checkpoints whose manifests say each took CHECKPOINT_MIB."""
    for step in steps:
        path = write_fake_checkpoint(root, step)
        manifest = json.loads((path / MANIFEST).read_text())
        manifest["files"]["weights.pt"][0] = CHECKPOINT_MIB * 2**20
        (path / MANIFEST).write_text(json.dumps(manifest))


def fake_disk(monkeypatch, root: Path, free_mib: int) -> None:
    """A file system with `free_mib` free now, and CHECKPOINT_MIB more for each checkpoint deleted from here on."""
    count = len(list_checkpoints(root))

    def disk_usage(path):
        free = (free_mib + CHECKPOINT_MIB * (count - len(list_checkpoints(root)))) * 2**20
        return Usage(10**12, 10**12 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def steps_left(root: Path) -> list[int]:
    return [int(p.name[5:]) for p in list_checkpoints(root)]


def test_retention_frees_room_first_when_it_safely_can(tmp_path, monkeypatch, capsys):
    fake_checkpoints(tmp_path, (100, 200, 300, 400, 500))
    fake_disk(monkeypatch, tmp_path, free_mib=100)
    ensure_room(tmp_path, tmp_path / "step_00000600", keep_last=3, keep_every=200, keep=(), is_main=True)
    # Retention keeps the last 3 and every 200th; after this save those are 600, 500, 400 (and 200): 100 and
    # 300 go now instead of after the save, which is enough.
    assert steps_left(tmp_path) == [500, 400, 200]
    assert "100.0 MiB free" in capsys.readouterr().out


def test_without_room_the_save_stops_naming_the_path_and_the_space(tmp_path, monkeypatch):
    fake_checkpoints(tmp_path, (100, 200))
    fake_disk(monkeypatch, tmp_path, free_mib=10)
    target = tmp_path / "step_00000300"
    with pytest.raises(SaveFailed) as stopped:
        ensure_room(tmp_path, target, keep_last=1, keep_every=0, keep=(tmp_path / "step_00000100",), is_main=True)
    assert stopped.value.collective
    assert str(stopped.value).startswith(f"no room for checkpoint {target}: the last one (step_00000200) took "
                                         f"{CHECKPOINT_MIB}.0 MiB and the file system of {tmp_path} has 10.0 MiB free")
    assert steps_left(tmp_path) == [200, 100]  # the newest complete one, and the one asked for, are never deleted


def test_a_directory_in_the_way_that_cannot_be_moved_stops_the_save(tmp_path, monkeypatch):
    from diffmoe_scale.train import checkpoint

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    in_the_way = write_fake_checkpoint(tmp_path, 300)  # a complete one of another branch: set aside, never deleted
    monkeypatch.setattr(checkpoint, "set_aside", refused)
    with pytest.raises(SaveFailed, match=f"cannot clear the way for checkpoint {in_the_way}: .*Permission denied"):
        ensure_room(tmp_path, in_the_way, keep_last=1, keep_every=0, keep=(), is_main=True)
    assert (in_the_way / MANIFEST).is_file()


@pytest.mark.parametrize("size", [1, 100_000], ids=["basic_ios", "unexpected_pos"])
def test_torch_save_refused_by_the_file_system_becomes_one_message(size, tmp_path):
    # torch.save to a path that refuses writes raises a RuntimeError without an errno; pin its two forms.
    with pytest.raises(SaveFailed) as stopped, reporting_write_errors(tmp_path / "step_00000001", rank=3):
        torch.save({"weights": torch.zeros(size)}, "/dev/full")
    assert not stopped.value.collective
    assert str(stopped.value).startswith(f"rank 3: writing checkpoint {tmp_path / 'step_00000001'} failed (torch.save "
                                         f"could not write: ")
    assert "free. That checkpoint was not published and the previous ones are intact" in str(stopped.value)
    with pytest.raises(SaveFailed, match=r"failed \(No space left on device\); the file system has"), \
            reporting_write_errors(tmp_path, rank=0), open("/dev/full", "wb") as file:
        file.write(b"x" * 2**16)
    with pytest.raises(RuntimeError, match="a collective failed"), reporting_write_errors(tmp_path, rank=0):
        raise RuntimeError("a collective failed")


def test_trainer_saves_check_the_room_and_a_failed_write_keeps_the_previous_checkpoint(runtime, tmp_path,
                                                                                     monkeypatch):
    from diffmoe_scale.train.trainer import Trainer

    config = load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", [
        "train.max_steps=4", "train.global_batch_size=32", f"train.out_dir={tmp_path}", "checkpoint.every_steps=2",
        "checkpoint.keep_last=1", "sample.steps=2", "sample.per_class=1"])
    trainer, root = Trainer(config, runtime), tmp_path / "checkpoints"
    first = root / "step_00000002"
    real_disk_usage = shutil.disk_usage
    # Room for the first checkpoint, none once it exists.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1, 1, 0) if (first / MANIFEST).exists()
                        else real_disk_usage(path))
    with pytest.raises(SaveFailed, match=f"no room for checkpoint {root / 'step_00000004'}: the last one"):
        trainer.train()
    assert trainer.step == 4 and list_checkpoints(root) == [first] and verify(first)[1] is None
    monkeypatch.setattr(shutil, "disk_usage", real_disk_usage)
    # A write that fails inside DeepSpeed's save, as on a full disk.
    monkeypatch.setattr(trainer.engine.checkpoint_engine, "save", lambda state, path: torch.save(state, "/dev/full"))
    with pytest.raises(SaveFailed, match="rank 0: writing checkpoint .*step_00000004 failed"):
        trainer.save_checkpoint()
    assert verify(first)[1] is None and (root / "latest").read_text() == "step_00000002\n"
    assert not (root / "step_00000004" / MANIFEST).exists()
    monkeypatch.undo()
    trainer.save_checkpoint()  # with room again, the unfinished save is replaced
    assert list_checkpoints(root) == [root / "step_00000004"] and verify(root / "step_00000004")[1] is None


def test_a_checkpoint_that_cannot_be_written_exits_4(tmp_path):
    # /dev/full/checkpoints cannot be created: a real OSError inside DeepSpeed's save.
    command = [sys.executable, "pretrain_diffmoe.py", "--config", "configs/digits_diffmoe_e4_flow.yaml"]
    for override in ("train.max_steps=2", "train.global_batch_size=32", "sample.steps=2", "sample.per_class=1",
                     f"train.out_dir={tmp_path}", "checkpoint.dir=/dev/full/checkpoints"):
        command += ["--set", override]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 4, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("error: rank 0: writing checkpoint /dev/full/checkpoints/step_00000002 failed (/dev/full/checkpoints: "
            "Not a directory); the file system has") in result.stderr
    assert "Traceback" not in result.stderr
