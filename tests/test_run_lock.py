"""One writer per run directory: a live holder is refused by name, a gone one is taken over."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffmoe_scale.train.run_lock import (LOCK_NAME, STALE_AFTER_S, RunLock, RunLockError, holder_record, read_lock,
                                          run_directory_lock)
from tests.helpers import clean_env

REPO = Path(__file__).resolve().parents[1]


def write_lock(run_dir: Path, holder: dict, heartbeat_age: float = 0.0) -> Path:
    """A lock file as `holder` would have left it, last refreshed `heartbeat_age` seconds ago."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(holder))
    when = time.time() - heartbeat_age
    os.utime(path, (when, when))
    return path


def held_by(path: Path) -> str:
    return read_lock(path)[0]["token"]


def holder_that_exited() -> dict:
    proc = subprocess.Popen(["sleep", "60"])
    holder = holder_record(proc.pid)
    proc.kill()
    proc.wait()
    return holder


def test_a_live_holder_on_this_host_is_refused_by_name(tmp_path):
    holder = holder_record(os.getppid())
    path = write_lock(tmp_path, holder, heartbeat_age=STALE_AFTER_S * 10)  # a live pid wins over an old heartbeat
    with pytest.raises(RunLockError) as refused:
        RunLock(tmp_path).acquire()
    assert (f"run directory {tmp_path} is in use by pid {os.getppid()} on host {socket.gethostname()}, started "
            f"{holder['started']} (lock {path}") in str(refused.value)
    assert held_by(path) == holder["token"]


@pytest.mark.parametrize("gone", ["exited", "pid_reused", "rebooted"])
def test_a_holder_gone_from_this_host_is_taken_over(gone, tmp_path, capsys):
    holder = holder_that_exited() if gone == "exited" else holder_record(os.getppid())
    if gone == "pid_reused":  # the pid runs, but it is another process than the one that took the lock
        holder["process_start"] += 1
    if gone == "rebooted":
        holder["boot_id"] = "an earlier boot"
    path = write_lock(tmp_path, holder)
    lock = RunLock(tmp_path)
    lock.acquire()
    reason = ("this host has rebooted since" if gone == "rebooted"
              else f"pid {holder['pid']} is not running on this host")
    assert (f"warning: took over the lock {path} of pid {holder['pid']} on host {socket.gethostname()}, started "
            f"{holder['started']}: {reason}") in capsys.readouterr().out
    assert held_by(path) == lock.holder["token"]
    lock.release()
    assert not path.exists()


def test_a_holder_on_another_host_is_refused_until_its_heartbeat_is_stale(tmp_path, capsys):
    holder = {**holder_record(os.getpid()), "host": "node-elsewhere", "pid": 4242}
    path = write_lock(tmp_path, holder, heartbeat_age=STALE_AFTER_S - 30)
    with pytest.raises(RunLockError, match="in use by pid 4242 on host node-elsewhere"):
        RunLock(tmp_path).acquire()
    write_lock(tmp_path, holder, heartbeat_age=STALE_AFTER_S + 30)
    lock = RunLock(tmp_path)
    lock.acquire()
    assert f"its heartbeat is {STALE_AFTER_S + 30} s old (stale after {STALE_AFTER_S} s)" in capsys.readouterr().out
    assert held_by(path) == lock.holder["token"]
    lock.release()


def test_the_heartbeat_refreshes_the_lock_and_notices_losing_it(tmp_path, capsys):
    lock = RunLock(tmp_path)
    lock.acquire()
    path = tmp_path / LOCK_NAME
    old = time.time() - 1000
    os.utime(path, (old, old))
    assert lock.refresh() and read_lock(path)[1] < 500
    other = holder_record(os.getppid())
    write_lock(tmp_path, other)
    assert not lock.refresh()
    assert f"warning: lost the run lock {path}" in capsys.readouterr().out
    lock.release()  # leaves the other holder's lock alone
    assert held_by(path) == other["token"]


def test_a_take_over_puts_back_a_lock_that_replaced_the_stale_one(tmp_path):
    stale, newer = holder_that_exited(), holder_record(os.getppid())
    path = write_lock(tmp_path, newer)  # another start took the stale lock over a moment ago
    assert not RunLock(tmp_path)._take_over(stale)
    assert held_by(path) == newer["token"]
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(ValueError), run_directory_lock(tmp_path, is_main=True):
        assert (tmp_path / LOCK_NAME).is_file()
        raise ValueError("the run failed")
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_start_is_refused_while_a_live_run_holds_the_directory(tmp_path):
    # This test process stands for the first run: it holds the lock and lives while the second starts.
    holder = holder_record(os.getpid())
    path = write_lock(tmp_path, holder)
    command = [sys.executable, "pretrain_diffmoe.py", "--config", "configs/digits_diffmoe_e4_flow.yaml",
               "--set", f"train.out_dir={tmp_path}", "--set", "train.max_steps=4"]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert (f"error: run directory {tmp_path} is in use by pid {os.getpid()} on host {socket.gethostname()}, "
            f"started {holder['started']}") in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME] and held_by(path) == holder["token"]
