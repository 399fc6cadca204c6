"""Routing decisions of a checkpointed block, kept from its forward for the recomputation in backward.

Activation checkpointing runs a block's forward again during backward. The routing must not run
again: top-C over the pool (and with expert parallelism the all-gather of the pool's scores and the
device-to-host copy of the all-to-all splits) would be paid twice, and its side effects (threshold
quantiles, capacity statistics) would happen twice. A checkpointed forward records each MoE layer's
decision on a tape of its own; the recomputation replays it, so the routing is the same by
construction.

A compiled block (torch.compile) is not run again in backward: the compiler's backward graph recomputes
what it did not keep. There `saved_routing_contexts` makes the recomputation keep the routing instead: the
outputs of the ops that choose tokens (top-k and sorts) are saved, never recomputed, so the recomputed
forward routes exactly as the forward did, and the rest of the routing (index arithmetic on them) is exact.
"""
import contextlib

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# The ops whose outputs decide which tokens each expert takes (top-C, the sorts of the routing and its plan).
ROUTING_OPS = frozenset({torch.ops.aten.topk.default, torch.ops.aten.sort.default, torch.ops.aten.sort.stable})

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


def _keep_routing(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in ROUTING_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def saved_routing_contexts():
    """torch.utils.checkpoint's `context_fn` of a compiled block (see the module doc)."""
    return create_selective_checkpoint_contexts(_keep_routing)
