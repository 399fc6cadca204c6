"""Fault injection: make a run fail at a named moment, as a crash or a signal would, for crash tests.

    DIFFMOE_FAULT=sigkill@step:13     SIGKILL at the boundary after step 13 (nothing after it is saved)
    DIFFMOE_FAULT=sigkill@save:8      SIGKILL while saving the checkpoint of step 8: its files are written,
                                      its manifest is not
    DIFFMOE_FAULT=sigusr1@step:5      send itself SIGUSR1 after step 5 (a preemption notice), then go on
    DIFFMOE_FAULT=sigusr1@pool:3      launch/sample.py: after writing the shard of token pool 3
    DIFFMOE_FAULT_RANK=1              only on rank 1 (default: every rank)

A test then names the moment instead of racing a running job with signals. Any signal name works
(sigint, sigterm, sigstop, ...); unset, nothing happens.
"""
import os
import signal

from ..config import ConfigError

POINTS = ("step", "save", "pool")


def planned() -> tuple[signal.Signals, str, int] | None:
    """(signal, point, step) of DIFFMOE_FAULT, None when unset; a ConfigError when it does not parse (checked at
    start-up, so a mistyped fault fails the run before it trains)."""
    spec = os.environ.get("DIFFMOE_FAULT")
    if not spec:
        return None
    try:
        name, where = spec.split("@")
        point, step = where.split(":")
        fault = signal.Signals[name.upper()]
        if point not in POINTS:
            raise ValueError(point)
        return fault, point, int(step)
    except (KeyError, ValueError):
        raise ConfigError(f"DIFFMOE_FAULT={spec!r}: expected <signal>@<{'|'.join(POINTS)}>:<step>, "
                          f"e.g. sigkill@step:13") from None


def inject(point: str, step: int, rank: int) -> None:
    """Deliver the planned signal to this process if it is planned at `point` of `step` for `rank`."""
    fault = planned()
    if fault is None or fault[1:] != (point, step):
        return
    only = os.environ.get("DIFFMOE_FAULT_RANK")
    if only is not None and int(only) != rank:
        return
    os.kill(os.getpid(), fault[0])
