"""One writer per run directory: rank 0 holds <out_dir>/run.lock while the run lives.

The lock is a file made whole and then hard-linked into place (link fails when the name exists, and is
atomic on NFS and Lustre, where flock may not reach other hosts), holding who took it: host, boot id,
pid, that process's start time, when, and a random token. While the run lives, a thread touches the
file every HEARTBEAT_S seconds. Another start finds the file and:
- refuses (exit 2, naming the holder) while the holder lives: on this host, while that pid runs with
  the recorded start time (a reused pid does not count); on another host, while the heartbeat is fresh;
- takes the lock over, saying so, when the holder is gone: its process is not running on this host,
  this host rebooted since, or its heartbeat is older than STALE_AFTER_S.
A take-over renames the stale file to a name of its own and checks it moved the file it judged stale
(putting back one that a faster process created meanwhile); the loser of any race finds a live lock.
"""
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..parallel.collectives import broadcast_object

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30
# A live holder's heartbeat is at most HEARTBEAT_S old, plus what a stat on another host may lag behind
# (NFS caches attributes up to 60 s by default) and a GIL or file-system stall of the holder's thread:
# 300 s is past all of these. It is also shorter than the time Slurm takes to declare a crashed node
# down (SlurmdTimeout, 300 s by default) and start the requeued job (which waits ~2 minutes), so a job
# requeued after a node failure finds the old lock stale and goes on.
STALE_AFTER_S = 300


class RunLockError(Exception):
    """This run cannot have the run directory: another live run holds it, or its lock cannot be made."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot; /proc/<pid>/stat field 22), None if unknown."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def holder_record(pid: int) -> dict:
    """What a lock file says about the process `pid` of this host holding it."""
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid, "process_start": process_start(pid),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "token": uuid.uuid4().hex}


def _running(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return start is None or process_start(pid) in (None, start)


def gone_reason(holder: dict, heartbeat_age: float) -> str | None:
    """Why the holder of a lock is gone (its lock may be taken over), or None while it may be alive."""
    if holder.get("host") == socket.gethostname() and holder.get("boot_id") == _boot_id():
        if isinstance(holder.get("pid"), int) and _running(holder["pid"], holder.get("process_start")):
            return None
        return f"pid {holder.get('pid')} is not running on this host"
    if holder.get("host") == socket.gethostname():
        return "this host has rebooted since"
    if heartbeat_age > STALE_AFTER_S:
        return f"its heartbeat is {heartbeat_age:.0f} s old (stale after {STALE_AFTER_S} s)"
    return None


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"


def read_lock(path: Path) -> tuple[dict, float] | None:
    """(holder, heartbeat age in seconds) of a lock file, or None when there is none; an unparsable
    file reads as a holder with nothing known but its heartbeat."""
    try:
        with open(path, "rb") as file:
            age = time.time() - os.fstat(file.fileno()).st_mtime
            holder = json.loads(file.read())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}, age
    return (holder if isinstance(holder, dict) else {}), age


class RunLock:
    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S):
        self.path = run_dir / LOCK_NAME
        self.heartbeat_s = heartbeat_s
        self.holder = holder_record(os.getpid())
        self._stop = threading.Event()
        self._thread = None

    def acquire(self) -> None:
        """Takes the lock (over from a gone holder, with a message) or raises RunLockError."""
        try:
            self._acquire()
        except OSError as err:
            raise RunLockError(f"run directory {self.path.parent}: cannot take its lock {self.path} ({err})") from err

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # each failed round saw a lock change hands meanwhile
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
                self._thread.start()
                return
            found = read_lock(self.path)
            if found is None:
                continue  # released meanwhile
            holder, age = found
            reason = gone_reason(holder, age)
            if reason is None:
                elsewhere = holder.get("host") != socket.gethostname()
                raise RunLockError(
                    f"run directory {self.path.parent} is in use by {describe(holder)} (lock {self.path}, "
                    f"heartbeat {age:.0f} s ago): one run at a time writes there. Stop that run first"
                    + (f", or if its node died, start again once its heartbeat is {STALE_AFTER_S} s old (or delete "
                       f"the lock file)" if elsewhere else ""))
            if self._take_over(holder):
                print(f"warning: took over the lock {self.path} of {describe(holder)}: {reason}", flush=True)
        raise RunLockError(f"run directory {self.path.parent}: its lock {self.path} kept changing hands while "
                           f"this run tried to take it; another run is starting there")

    def _create(self) -> bool:
        """Link a whole lock file into place; False when one exists."""
        staging = self.path.with_name(f"{LOCK_NAME}.{self.holder['token']}")
        staging.write_text(json.dumps(self.holder))
        try:
            os.link(staging, self.path)
        except FileExistsError:
            pass
        held = os.stat(staging).st_nlink == 2  # also right when NFS reports a retried link as existing
        staging.unlink()
        return held

    def _take_over(self, stale: dict) -> bool:
        """Move the stale lock out of the way; False when what moved was not it (a newer lock is put back)."""
        moved = self.path.with_name(f"{LOCK_NAME}.stale-{self.holder['token']}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return False
        judged = read_lock(moved)[0].get("token") == stale.get("token")
        if not judged:
            try:
                os.link(moved, self.path)
            except FileExistsError:
                pass
        moved.unlink()
        return judged

    def holds(self) -> bool:
        found = read_lock(self.path)
        return found is not None and found[0].get("token") == self.holder["token"]

    def refresh(self) -> bool:
        """Touch the lock file (the heartbeat); False, with a warning, when this process no longer holds it."""
        if not self.holds():
            print(f"warning: lost the run lock {self.path} (taken over or removed): another run may write into "
                  f"{self.path.parent}", flush=True)
            return False
        os.utime(self.path)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.refresh():
                    return
            except OSError as err:  # a file-system hiccup: try again at the next beat
                print(f"warning: could not refresh the run lock {self.path}: {err}", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.holds():
            self.path.unlink()


@contextmanager
def run_directory_lock(run_dir: Path, is_main: bool):
    """Rank 0 holds `run_dir`'s lock while the block runs (collective): when another run holds it, every
    rank raises RunLockError before anything is written there."""
    lock = RunLock(run_dir) if is_main else None
    refusal = None
    if lock is not None:
        try:
            lock.acquire()
        except RunLockError as err:
            refusal = str(err)
    refusal = broadcast_object(refusal)
    if refusal:
        raise RunLockError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
