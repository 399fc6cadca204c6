"""Several token pools in one batch.

Classifier-free guidance runs the conditional and the unconditional half of a batch in one forward.
Under batch-dependent routing (DiffMoE's threshold rule: counts over the pool, then top by router
score; or top-C over the pool) one half would then change the other's routing. Inside
`separate_pools(model, 2)` each MoE layer treats each half of each rank's batch as a pool of its own
(with expert parallelism: that half of every rank of the dispatch together), so the one forward routes
exactly as two forwards would.
"""
import contextlib

import torch


@contextlib.contextmanager
def separate_pools(model, count: int):
    """While active, the MoE layers of `model` (none for a model without `moe_layers`) split each rank's
    batch into `count` equal parts, each its own pool."""
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    for layer in layers:
        layer.batch_pools = count
    try:
        yield
    finally:
        for layer in layers:
            layer.batch_pools = 1


def pool_order(ranks: int, rows_per_rank: int, parts: int, device=None) -> torch.Tensor:
    """Gathered rows are rank-major, each rank's rows in `parts` equal parts; this order of them puts
    part 0 of every rank first (in rank order), then part 1, ...: [ranks * rows_per_rank]."""
    rows = torch.arange(ranks * rows_per_rank, device=device)
    return rows.view(ranks, parts, rows_per_rank // parts).transpose(0, 1).reshape(-1)
