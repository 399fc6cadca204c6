"""Bounded waits: every process group gets the timeout of `parallel.timeout_minutes`, and a collective that
times out (or loses its peer) ends the rank with one line that names the collective.

Without this, groups keep torch's defaults: `dist.new_group` without a timeout takes the backend's default
(30 min for gloo, 10 min for NCCL), not the world group's, and DeepSpeed's expert groups are made that way
(its `deepspeed.comm.new_group` passes no timeout; `DEEPSPEED_TIMEOUT` reaches only the world group).
megatron-core's groups take `initialize_model_parallel(distributed_timeout_minutes=...)`.

What a timeout does depends on the backend: gloo raises in the rank that waits (caught in the entry point
and reported by `describe_collective_failure`); NCCL's watchdog thread aborts the process after logging
the timed-out work (its OpType and sequence number), so the rank ends there with SIGABRT.
"""
import os
import traceback
from datetime import timedelta

import torch.distributed as dist

EXIT_COLLECTIVE_FAILED = 5  # a collective timed out or lost a peer: another rank stalled or died
_C10D_FILE = os.path.join("torch", "distributed", "distributed_c10d.py")
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def apply_collective_timeout(minutes: float) -> int:
    """Give every process group this process belongs to a timeout of `minutes`; returns how many there are.
    Call it again after something may have made more groups (DeepSpeed's engine clones the world group)."""
    if not dist.is_initialized():
        return 0
    from torch.distributed.distributed_c10d import _world  # torch lists the live groups nowhere public

    timeout = timedelta(minutes=minutes)
    groups = list(_world.pg_map)
    for group in groups:
        group.set_timeout(timeout)
    return len(groups)


def _place(frame: traceback.FrameSummary) -> str:
    return f"{os.path.relpath(frame.filename, _PROJECT_ROOT)}:{frame.lineno} in {frame.name}"


def describe_collective_failure(error: BaseException, timeout_minutes: float) -> str | None:
    """'collective <name> (<our call site>) timed out after N min' when `error` came out of a torch.distributed
    collective (directly, or through DeepSpeed, megatron-core or autograd); None for any other error."""
    if not isinstance(error, RuntimeError):
        return None
    frames = traceback.extract_tb(error.__traceback__)
    entered = next((i for i, frame in enumerate(frames) if frame.filename.endswith(_C10D_FILE)), None)
    if entered is None:
        return None
    ours = [frame for frame in frames[:entered] if frame.filename.startswith(_PROJECT_ROOT + os.sep)
            and os.sep + "site-packages" + os.sep not in frame.filename]
    where = f" (called from {' via '.join(_place(frame) for frame in ours[-2:])})" if ours else ""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "timed out" in message.lower():
        what = f"timed out after {timeout_minutes:g} min (parallel.timeout_minutes)"
    else:
        what = f"failed: {message}"
    return f"collective {frames[entered].name}{where} {what}"
