"""Jobs that fail fast and loud: a rank frozen mid-run is reported and its peer ends within the collective
timeout naming the collective; stop signals reach every rank under launch/supervise.py, which exits with the
ranks' status; ranks whose launcher dies save and stop; the stop handler only records."""
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from diffmoe_scale.parallel.timeouts import EXIT_COLLECTIVE_FAILED, apply_collective_timeout, describe_collective_failure
from diffmoe_scale.train.stop import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopRequest
from diffmoe_scale.train.watchdog import StallWatchdog
from tests.helpers import clean_env, processes_with, read_metrics

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
SUPERVISE = [sys.executable, "launch/supervise.py"]
MARKER = "DIFFMOE_TEST_JOB"  # every process of a job a test starts carries it, so /proc tells what is left
TINY = ["train.global_batch_size=32", "sample.steps=2", "sample.per_class=1", "logging.every_steps=1",
        "parallel.ep=2", "checkpoint.every_steps=0"]


def start(command: list[str], marker: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**clean_env(), MARKER: marker, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def torchrun_training(out_dir: Path, *overrides: str) -> list[str]:
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "pretrain_diffmoe.py",
               "--config", "configs/digits_diffmoe_e4_flow.yaml"]
    for override in (*TINY, "train.max_steps=100000", f"train.out_dir={out_dir}", *overrides):
        command += ["--set", override]
    return command


def wait_for_step(proc: subprocess.Popen, out_dir: Path, step: int) -> None:
    deadline = time.time() + 300  # a guard against a hang, not a speed check
    while not ((out_dir / "metrics.jsonl").exists() and len(read_metrics(out_dir)) >= step):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline, "the run did not reach the step"
        time.sleep(0.2)


def wait_until_gone(marker: str) -> None:
    deadline = time.time() + 180  # a guard against processes that never stop, not a speed check
    while processes_with(MARKER, marker):
        if time.time() > deadline:
            left = processes_with(MARKER, marker)
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"processes left running: {sorted(left)}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------------------
# The stop handler


def test_stop_handler_records_the_signal_and_prints_nothing(capfd):
    stop = StopRequest()
    try:
        signal.raise_signal(signal.SIGUSR1)
        assert stop.exit_code == EXIT_PREEMPTED
        assert capfd.readouterr() == ("", "")  # nothing from inside the handler
        stop.announce()  # the loop, at its next step boundary
        assert capfd.readouterr().out == "SIGUSR1: saving and stopping at the end of this step\n"
        stop.announce()
        assert capfd.readouterr().out == ""
    finally:
        stop.restore()


def test_stop_handler_is_installed_before_distributed_start_up(monkeypatch):
    import pretrain_diffmoe
    from diffmoe_scale.parallel import runtime

    seen = {}

    def init_runtime():
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        raise SystemExit(0)

    monkeypatch.setattr(runtime, "init_runtime", init_runtime)
    monkeypatch.setattr(pretrain_diffmoe, "tie_to_launcher", lambda: None)  # not this test process
    previous = {signum: signal.getsignal(signum) for signum in StopRequest.EXIT_CODES}
    try:
        with pytest.raises(SystemExit):
            pretrain_diffmoe.main(["--config", "configs/digits_diffmoe_e4_flow.yaml"])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert isinstance(getattr(seen["handler"], "__self__", None), StopRequest)


# ---------------------------------------------------------------------------------------------------------
# Stall reports and collective timeouts


def test_watchdog_reports_a_stall_once_and_its_end():
    now = [100.0]
    watchdog = StallWatchdog(rank=3, after_s=60, clock=lambda: now[0], start=False)
    watchdog.tick(7)
    now[0] += 59
    assert watchdog.check() is None
    now[0] += 2
    assert watchdog.check() == "rank 3: no progress for 61 s at step 7 (training)"
    now[0] += 300
    assert watchdog.check() is None  # once per stall
    watchdog.tick(8, "saving a checkpoint")
    assert watchdog.check() == "rank 3: progressing again at step 8 (saving a checkpoint)"
    assert watchdog.check() is None
    now[0] += 60
    assert watchdog.check() == "rank 3: no progress for 60 s at step 8 (saving a checkpoint)"


@pytest.mark.parametrize("overrides, key", [
    (["parallel.timeout_minutes=0"], "parallel.timeout_minutes"),
    (["parallel.timeout_minutes=1", "parallel.stall_warning_minutes=1"], "parallel.stall_warning_minutes"),
])
def test_timeout_and_stall_warning_are_validated(overrides, key):
    from diffmoe_scale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", overrides)


GLOO_TIMEOUT = "[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 30000ms for send operation to complete"


def test_a_failed_collective_is_named_with_its_call_site(tmp_path):
    # A stand-in for torch's module of collectives, raising what gloo raises when a peer never comes.
    c10d = tmp_path / "torch" / "distributed" / "distributed_c10d.py"
    c10d.parent.mkdir(parents=True)
    c10d.write_text("def all_to_all_single(message):\n    raise RuntimeError(message)\n")
    collectives = {}
    exec(compile(c10d.read_text(), str(c10d), "exec"), collectives)

    def dispatch(message):
        collectives["all_to_all_single"](message)

    described = {}
    for message in (GLOO_TIMEOUT, "Connection closed by peer [127.0.0.1]:4242"):
        with pytest.raises(RuntimeError) as caught:
            dispatch(message)
        described[message] = describe_collective_failure(caught.value, 0.5)
    call_site = (r"collective all_to_all_single \(called from tests/test_failures.py:\d+ in "
                 r"test_a_failed_collective_is_named_with_its_call_site via tests/test_failures.py:\d+ in dispatch\)")
    assert re.fullmatch(call_site + r" timed out after 0.5 min \(parallel.timeout_minutes\)", described[GLOO_TIMEOUT])
    assert re.fullmatch(call_site + r" failed: Connection closed by peer \[127.0.0.1\]:4242",
                        described["Connection closed by peer [127.0.0.1]:4242"])
    with pytest.raises(RuntimeError) as caught:
        raise RuntimeError("not from a collective")
    assert describe_collective_failure(caught.value, 0.5) is None


def test_every_process_group_gets_the_timeout():
    """Pins the private `_world.pg_map` (torch's list of live groups) that `apply_collective_timeout` walks, and
    the fact that makes it necessary: a new group takes the backend's default, not the world's timeout."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _world

    if not dist.is_initialized():  # a world of one (as other tests in this process may have made through DeepSpeed)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def timeouts() -> dict:
        return {group: group._get_backend(torch.device("cpu")).options._timeout for group in _world.pg_map}

    group = dist.new_group([0])
    assert timeouts()[group] == timedelta(minutes=30)  # gloo's default
    try:
        assert apply_collective_timeout(0.5) == len(_world.pg_map) >= 2
        assert set(timeouts().values()) == {timedelta(seconds=30)}
    finally:
        apply_collective_timeout(10.0)


@pytest.mark.slow
def test_a_frozen_rank_is_reported_and_its_peer_ends_naming_the_collective(tmp_path):
    marker = uuid.uuid4().hex
    # Rank 1 stops dead after step 3, holding its sockets open.
    fault = {"DIFFMOE_FAULT": "sigstop@step:3", "DIFFMOE_FAULT_RANK": "1"}
    proc = start([*SUPERVISE, *torchrun_training(tmp_path, "parallel.timeout_minutes=0.25",
                                                 "parallel.stall_warning_minutes=0.05")], marker, fault)
    try:
        output = ""
        while " timed out after " not in output:  # rank 0's report, or the end of the job's output
            line = proc.stdout.readline()
            if not line:
                break
            output += line
        # torchrun now SIGTERMs rank 1, which is stopped and cannot take it, and SIGKILLs it 30 s later: do
        # that at once.
        for pid, environment in processes_with(MARKER, marker).items():
            if environment.get("RANK") == "1":
                os.kill(pid, signal.SIGKILL)
        output += proc.communicate(timeout=300)[0]
    finally:
        wait_until_gone(marker)
    assert proc.returncode == EXIT_COLLECTIVE_FAILED, output[-4000:]
    assert re.search(r"^rank 0: no progress for \d+ s at step \d+ \(training\)$", output, re.MULTILINE), output[-4000:]
    failure = re.search(r"^rank 0: collective (\w+) \(called from (\S+):\d+ in \w+.*\) timed out after 0.25 min "
                        r"\(parallel.timeout_minutes\) at step \d+; another rank stalled or died$", output, re.MULTILINE)
    assert failure, output[-4000:]
    assert failure.group(1) in ("all_gather", "all_reduce", "all_to_all_single", "broadcast", "barrier")


# ---------------------------------------------------------------------------------------------------------
# Stop signals and launchers


def read_ready_ranks(proc: subprocess.Popen) -> dict[int, int]:
    """rank -> pid from the stand-in ranks' "rank R ready, pid P" lines."""
    ready = {}
    while len(ready) < 2:
        line = proc.stdout.readline()
        assert line, f"the job ended before its ranks were ready: {proc.communicate()[0]}"
        found = re.match(r"rank (\d+) ready, pid (\d+)", line)
        if found:
            ready[int(found.group(1))] = int(found.group(2))
    return ready


@pytest.mark.parametrize("signum, expected", [(signal.SIGUSR1, EXIT_PREEMPTED), (signal.SIGINT, EXIT_INTERRUPTED),
                                              (signal.SIGTERM, EXIT_PREEMPTED)], ids=["SIGUSR1", "SIGINT", "SIGTERM"])
def test_supervisor_forwards_a_stop_signal_to_each_rank_and_exits_with_their_status(signum, expected):
    marker = uuid.uuid4().hex
    proc = start([*SUPERVISE, sys.executable, "tests/distributed/stand_in_launcher.py"], marker)
    try:
        read_ready_ranks(proc)
        os.kill(proc.pid, signum)
        output = proc.communicate(timeout=120)[0]
    finally:
        wait_until_gone(marker)
    # The stand-in launcher reports 1, as torchrun does; each rank got the signal once.
    assert proc.returncode == expected, output
    assert output.count(f"{signal.Signals(signum).name}: saving and stopping") == 2, output
    assert not processes_with(MARKER, marker)  # the supervisor returns only when the whole job is gone


def test_ranks_stop_when_their_launcher_dies():
    marker = uuid.uuid4().hex
    launcher = start([sys.executable, "tests/distributed/stand_in_launcher.py"], marker)
    read_ready_ranks(launcher)
    launcher.kill()  # nothing can forward anything now: the ranks are orphans in sessions of their own
    launcher.wait()
    wait_until_gone(marker)
    assert launcher.stdout.read().count("SIGTERM: saving and stopping") == 2


@pytest.mark.slow
def test_sigusr1_to_supervised_torchrun_saves_on_both_ranks_and_exits_75(tmp_path):
    marker = uuid.uuid4().hex
    proc = start([*SUPERVISE, *torchrun_training(tmp_path)], marker)
    try:
        wait_for_step(proc, tmp_path, 3)
        os.kill(proc.pid, signal.SIGUSR1)
        output = proc.communicate(timeout=300)[0]
    finally:
        wait_until_gone(marker)
    assert proc.returncode == EXIT_PREEMPTED, output[-4000:]
    assert output.count("SIGUSR1: saving and stopping at the end of this step") == 2, output[-4000:]
    stopped = int(re.search(r"stopped at step (\d+);", output).group(1))
    assert (tmp_path / "checkpoints" / f"step_{stopped:08d}" / "manifest.json").is_file()
    assert {path.name for path in (tmp_path / "checkpoints" / f"step_{stopped:08d}").glob("trainer_rank_*.pt")} == {
        "trainer_rank_00000.pt", "trainer_rank_00001.pt"}


@pytest.mark.slow
def test_workers_of_a_torchrun_killed_by_sigusr1_save_and_stop(tmp_path):
    marker = uuid.uuid4().hex
    proc = start(torchrun_training(tmp_path), marker)
    try:
        wait_for_step(proc, tmp_path, 3)
        os.kill(proc.pid, signal.SIGUSR1)  # torchrun has no handler for it: it dies at once
        proc.wait(timeout=60)
    finally:
        wait_until_gone(marker)
    assert proc.returncode == -signal.SIGUSR1
    output = proc.stdout.read()
    assert output.count("SIGTERM: saving and stopping at the end of this step") == 2, output[-4000:]
    checkpoints = list((tmp_path / "checkpoints").glob("step_*/manifest.json"))
    assert len(checkpoints) == 1 and int(checkpoints[0].parent.name[5:]) >= 3
