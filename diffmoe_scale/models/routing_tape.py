"""Routing decisions of a checkpointed block, kept from its forward for the recomputation in backward.

Activation checkpointing runs a block's forward again during backward. The routing must not run
again: top-C over the pool (and with expert parallelism the all-gather of the pool's scores and the
device-to-host copy of the all-to-all splits) would be paid twice, and its side effects (threshold
quantiles, capacity statistics) would happen twice. A checkpointed forward records each MoE layer's
decision on a tape of its own; the recomputation replays it, so the routing is the same by
construction.
"""
import contextlib

_active = None  # (tape, replaying) of the checkpointed forward running now, if any


class RoutingTape:
    """One checkpointed call's decisions, by layer."""

    def __init__(self):
        self.decisions = {}

    def contexts(self):
        """(forward context, recomputation context): torch.utils.checkpoint's `context_fn` result."""
        return self._running(replaying=False), self._running(replaying=True)

    @contextlib.contextmanager
    def _running(self, replaying: bool):
        global _active
        outer, _active = _active, (self, replaying)
        try:
            yield
        finally:
            _active = outer


def replayed(layer):
    """The decision `layer` recorded in the forward that is being recomputed now; None outside a recomputation."""
    if _active is None or not _active[1]:
        return None
    return _active[0].decisions[layer]


def record(layer, decision) -> None:
    """Keep `layer`'s decision for the recomputation of this forward (nothing outside a checkpointed forward)."""
    if _active is not None and not _active[1]:
        _active[0].decisions[layer] = decision
