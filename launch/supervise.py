#!/usr/bin/env python
"""Run a multi-process launcher so that stop signals and the exit status work as for one process.

  python launch/supervise.py torchrun --nproc_per_node 8 pretrain_diffmoe.py --config C.yaml
  python launch/supervise.py deepspeed --num_gpus 8 pretrain_diffmoe.py --config C.yaml
  python launch/supervise.py mpirun -n 8 python pretrain_diffmoe.py --config C.yaml

Launchers treat stop signals their own ways: torchrun dies of SIGUSR1 (the Slurm recipes' preemption
signal) and kills its workers 30 s after SIGTERM or Ctrl-C (--shutdown-timeout), the deepspeed launcher
kills the ranks' process trees 30 s after SIGINT or SIGTERM, and torchrun and mpirun report 1 for any
failing rank, also for one that saved and exited 75. Under this wrapper:

  - SIGUSR1, SIGTERM and SIGINT (Ctrl-C) go to every rank directly, once, as if it ran alone: the ranks
    save at the next step boundary and exit (a second Ctrl-C aborts); the launcher, started in a session
    of its own, never sees them;
  - the exit status is the ranks' own: 75 after a preemption save, 130 after Ctrl-C, 2 for a bad input,
    4 when a checkpoint could not be written, 5 when a collective timed out (see `pretrain_diffmoe.py --help`); the launcher's when no rank left one;
  - it returns only once every process of the job has exited (it adopts orphaned ones as their subreaper);
    if it is killed itself, the launcher gets SIGKILL and its ranks then stop as when any launcher dies.

Each rank registers its pid and leaves its exit status in a private directory the wrapper names in
DIFFMOE_SUPERVISOR_DIR. Under Slurm, srun passes signals and statuses itself (slurm/lib.sh).
"""
import argparse
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffmoe_scale.cli import docstring_parser
from diffmoe_scale.parallel.launcher import PR_SET_PDEATHSIG, SUPERVISOR_DIR

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def registered_pids(directory: Path) -> list[int]:
    """Ranks that registered and have not reported an exit."""
    return [int(path.name[4:]) for path in directory.glob("pid_*") if not (directory / f"exit_{path.name[4:]}").exists()]


def reported_statuses(directory: Path) -> list[int]:
    return [int(path.read_text()) for path in directory.glob("exit_*")]


def job_status(launcher_status: int, reported: list[int]) -> int:
    """The launcher's status when it succeeded or no rank reported one; otherwise the highest the ranks reported
    (every rank of a stop reports the same), or the launcher's if all ranks that reported succeeded."""
    if launcher_status == 0 or not reported:
        return launcher_status
    return max(reported) or launcher_status


def is_rank_of(pid: int, directory: Path) -> bool:
    """Whether `pid` still is a rank of this job (a pid may be reused once its process is gone)."""
    try:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{SUPERVISOR_DIR}={directory}".encode() in environment


def exit_code(wait_status: int) -> int:
    """As a shell reports it: 128 + N for a process killed by signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def supervise(launcher_pid: int, directory: Path, received: list[int]) -> int:
    """Forward each received signal once to every rank (also to ranks that register later), reap every process
    of the job, and return the launcher's exit code."""
    forwarded, sent, launcher_status = [], {}, None
    while True:
        while received:
            forwarded.append(received.pop(0))
        for pid in registered_pids(directory):
            pending, sent[pid] = forwarded[sent.get(pid, 0):], len(forwarded)
            for signum in pending:
                if is_rank_of(pid, directory):
                    os.kill(pid, signum)
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # the launcher and every orphan it left have exited
            return launcher_status
        if pid == launcher_pid:
            launcher_status = exit_code(status)
        if pid == 0:
            time.sleep(0.1)


def main(argv=None) -> int:
    parser = docstring_parser(__doc__)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the launcher and its arguments")
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("give the launcher command to run")
    received = []
    for signum in FORWARDED:
        signal.signal(signum, lambda signum, frame: received.append(signum))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    with tempfile.TemporaryDirectory(prefix="diffmoe-supervisor-") as directory:
        try:
            launcher = subprocess.Popen(args.command, env={**os.environ, SUPERVISOR_DIR: directory},
                                        start_new_session=True,
                                        preexec_fn=lambda: libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0))
        except OSError as err:
            print(f"error: {args.command[0]}: cannot start it ({err.strerror})", file=sys.stderr)
            return 2
        launcher_status = supervise(launcher.pid, Path(directory), received)
        launcher.returncode = launcher_status  # reaped above: Popen must not wait for it again
        return job_status(launcher_status, reported_statuses(Path(directory)))


if __name__ == "__main__":
    sys.exit(main())
