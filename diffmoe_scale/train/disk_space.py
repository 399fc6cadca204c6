"""Room for checkpoints: free space is checked before a save, and a save that cannot write ends in one
message naming the path and the space instead of a traceback from deep inside torch.save."""
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..parallel.collectives import broadcast_object
from .checkpoint import make_room_for, newest_complete, prune

# What torch.save(obj, <path>) raises when the file system refuses a write (it has no errno): its zip
# writer checks each write's position ("[enforce fail at inline_container.cc:...] unexpected pos") and
# the file stream underneath throws "basic_ios::clear: iostream error". tests/test_disk_space.py pins both.
TORCH_WRITE_ERRORS = ("inline_container.cc", "basic_ios::clear")


class SaveFailed(Exception):
    """A checkpoint could not be written. `collective`: every rank raised it at the same point; otherwise
    this rank alone did, while the others may be waiting inside the save's collectives."""

    def __init__(self, message: str, collective: bool):
        super().__init__(message)
        self.collective = collective


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def free_bytes(path: Path) -> int:
    """Free space (for an unprivileged writer) on the file system that holds `path` or would hold it."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_room(root: Path, target: Path, keep_last: int, keep_every: int, keep: tuple[Path, ...],
                is_main: bool) -> None:
    """Before saving `target` under `root` (collective): clear the way (`make_room_for`); when the file
    system has less free space than the newest complete checkpoint took, first delete what retention
    deletes after this save anyway (never the newest complete one, nor those in `keep`); if still short,
    or the way cannot be cleared, SaveFailed on every rank."""
    shortfall = broadcast_object(_shortfall(root, target, keep_last, keep_every, keep) if is_main else None)
    if shortfall:
        raise SaveFailed(shortfall, collective=True)


def _shortfall(root: Path, target: Path, keep_last: int, keep_every: int, keep: tuple[Path, ...]) -> str | None:
    try:
        make_room_for(target)
    except OSError as err:
        return f"cannot clear the way for checkpoint {target}: {err}"
    last = newest_complete(root)
    if last is None:
        return None  # nothing to size the new one by: a failing write reports itself
    needed = sum(size for size, _ in last[1]["files"].values())
    free = free_bytes(root)
    if free >= needed:
        return None
    deleted = prune(root, max(keep_last - 1, 1), keep_every, keep)
    if deleted:
        print(f"checkpoint: {mib(free)} free in {root}, {mib(needed)} needed; deleted "
              f"{', '.join(p.name for p in deleted)} now rather than after this save, as retention would", flush=True)
        free = free_bytes(root)
    if free >= needed:
        return None
    return (f"no room for checkpoint {target}: the last one ({last[0].name}) took {mib(needed)} and the file "
            f"system of {root} has {mib(free)} free. The checkpoints there are intact: free space (or lower "
            f"checkpoint.keep_last), then run the same command to resume")


@contextmanager
def reporting_write_errors(target: Path, rank: int):
    """Turns an OSError, or torch's error for a write the file system refused, raised while writing
    checkpoint `target` into SaveFailed naming it and the free space (on this rank alone)."""
    try:
        yield
    except OSError as err:
        detail = err.strerror or str(err)
        detail = f"{err.filename}: {detail}" if err.filename else detail
        raise SaveFailed(_write_failure(target, rank, detail), collective=False) from err
    except RuntimeError as err:
        if not any(marker in str(err) for marker in TORCH_WRITE_ERRORS):
            raise
        detail = f"torch.save could not write: {str(err).strip().splitlines()[0]}"
        raise SaveFailed(_write_failure(target, rank, detail), collective=False) from err


def _write_failure(target: Path, rank: int, detail: str) -> str:
    return (f"rank {rank}: writing checkpoint {target} failed ({detail}); the file system has "
            f"{mib(free_bytes(target))} free. That checkpoint was not published and the previous ones are "
            f"intact: free space, then run the same command to resume")
