"""Where a step's time goes: data, forward, backward, optimizer, and the all-to-alls within forward and backward.

Timing a phase on a GPU means waiting for the device at its boundaries, which costs the overlap of host
and device; so only the steps asked for (the logging steps) are timed, and the others wait for nothing.
"""
import contextlib
import time

import torch

from ..parallel.expert_parallel import ExpertParallelDispatch

PHASES = ("data", "forward", "backward", "optimizer")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    def __init__(self, model, device: torch.device):
        self.device = device
        self.dispatches = [layer.dispatch for layer in model.moe_layers()
                           if isinstance(layer.dispatch, ExpertParallelDispatch)]
        self.active = False
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def start_step(self, timed: bool) -> None:
        """Times the coming step's phases if `timed` (adding to what earlier timed steps left)."""
        self.active = timed
        for dispatch in self.dispatches:
            dispatch.timed = timed

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.active:
            yield
            return
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """Seconds per phase of the timed steps since the last call ("all_to_all": within forward and backward)."""
        seconds = {**self.seconds, "all_to_all": sum(d.exchange_seconds for d in self.dispatches)}
        self.seconds = dict.fromkeys(PHASES, 0.0)
        for dispatch in self.dispatches:
            dispatch.exchange_seconds = 0.0
        return seconds
