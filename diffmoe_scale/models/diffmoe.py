"""DiffMoE layer: expert choice over a token pool, with a capacity predictor and dynamic thresholds.

Training: the tokens of a pool are flattened; each expert takes its top-C tokens by router score,
C = int(pool_size / E * capacity); a token's output is the score-weighted sum over the experts
that took it (0..E of them). Pools: "ep_group" is every token of the dispatch's ranks (one
process: its batch, as DiffMoE), "local" is each rank's own batch (the authors' DDP code),
"sample" makes each sample its own pool (the EC-DiT baseline, no predictor). Guidance splits a batch
into two pools of either kind (see `pools`).

Routing runs in fp32 whatever the model's dtype: router scores, top-C, the capacity predictor, its
loss and the thresholds (which stay fp32 when the module is cast to bf16).

The capacity predictor sees the detached layer input and learns (BCE) the routing mask; per expert,
a threshold tracks the C-th largest predictor probability of the pool by EMA. The forward only
records that quantile (`pending_quantile`); `update_thresholds` applies it once per optimizer
step. The training routing is decided once per forward; a forward recomputed by activation
checkpointing replays it (see `routing_tape`). At inference the predictor and thresholds decide how
many tokens each expert takes (see `inference_routing`).
"""
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import routing_tape
from .experts import RoutedFFN, Routing, router_scores, routing_dtype, routing_from_mask, wide_linear
from .pools import pool_order

POOLS = ("ep_group", "local", "sample")


class TopCDecision(NamedTuple):
    plan: Any  # the dispatch's plan of the routing
    predictor_target: torch.Tensor | None  # [N, E] this rank's rows of the routing mask


class DiffMoELayer(RoutedFFN):
    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        capacity: float = 1.0,
        pool: str = "ep_group",
        use_predictor: bool = True,
        threshold_ema: float = 0.95,
        inference_routing: str = "threshold",
        shared_expert: bool = False,
    ):
        super().__init__(dim, hidden_dim, num_experts, shared_expert)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if pool == "sample" and use_predictor:
            raise ValueError("the capacity predictor belongs to the batch pool; pool='sample' is expert choice")
        self.capacity = capacity
        self.pool = pool
        self.threshold_ema = threshold_ema
        self.inference_routing = inference_routing if use_predictor else "capacity"
        self.predictor = (
            nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, num_experts)) if use_predictor else None
        )
        self.register_buffer("thresholds", torch.zeros(num_experts))
        self.pending_quantile = None

    def _apply(self, fn, recurse=True):
        """A cast to bf16/fp16 leaves the thresholds in fp32 (an EMA with decay 0.95 in bf16 would lose its
        increments), taken from their values before the cast; moves apply to them as to the rest."""
        thresholds = self.thresholds
        super()._apply(fn, recurse)
        dtype = routing_dtype(self.thresholds.dtype)
        if dtype != self.thresholds.dtype:
            self.thresholds = thresholds.to(device=self.thresholds.device, dtype=dtype)
        return self

    def predictor_logits(self, tokens):
        """The capacity predictor [N, E] in the routing dtype."""
        first, _, last = self.predictor
        hidden = F.silu(wide_linear(tokens, first.weight, first.bias))
        return wide_linear(hidden, last.weight, last.bias)

    def pool_size(self, batch: int, seq: int) -> int:
        """Tokens per pool; the gathered tokens of the dispatch, in `gathered_order`, split into pools of this size."""
        if self.pool == "sample":
            return seq
        return self.pool_batch(batch) * seq * (self.dispatch.size if self.pool == "ep_group" else 1)

    def gathered_order(self, local_tokens: int):
        """The order of the gathered rows that makes each pool contiguous; None where they are already (one
        pool per batch, or pools within each rank's rows)."""
        if self.pool != "ep_group" or self.batch_pools == 1 or self.dispatch.size == 1:
            return None
        return pool_order(self.dispatch.size, local_tokens, self.batch_pools, self.router.weight.device)

    def static_routing(self) -> bool:
        """Top-C (training, and capacity routing at inference): k tokens per expert and pool. The thresholds'
        counts (inference) depend on the data."""
        return self.training or self.inference_routing == "capacity"

    def forward(self, x):
        batch, seq, dim = x.shape
        tokens = x.reshape(-1, dim)
        scores = router_scores(self.router, tokens)  # [N, E], fp32
        pool_size = self.pool_size(batch, seq)
        if not self.static_routing():
            routing = self.threshold_routing(tokens, scores, pool_size)
            out = self.route(tokens, scores, routing, len(tokens) * self.dispatch.size)
            return self.add_shared(x, out.view_as(x)), {}
        use_predictor = self.training and self.predictor is not None
        predictor_logits = self.predictor_logits(tokens.detach()) if use_predictor else None
        decision = routing_tape.replayed(self)  # set when activation checkpointing recomputes this forward
        if decision is None:
            decision = self.decide_top_c(scores, predictor_logits, pool_size)
            routing_tape.record(self, decision)
        losses = {}
        if predictor_logits is not None:
            losses["predictor"] = F.binary_cross_entropy_with_logits(predictor_logits, decision.predictor_target)
        out = self.dispatch.combine(tokens, scores, decision.plan, self.experts)
        return self.add_shared(x, out.view_as(x)), losses

    def decide_top_c(self, scores, predictor_logits, pool_size: int) -> TopCDecision:
        """Training routing, once per step: each expert's top-C tokens of every pool, the dispatch plan,
        the predictor's target (this rank's rows of the routing mask) and the threshold quantile."""
        pooled = self._gather_routing_inputs(scores, predictor_logits)
        order = self.gathered_order(len(scores))
        if order is not None:
            pooled = pooled.index_select(0, order)
        k = self.tokens_per_expert(pool_size)
        pool_scores = pooled[:, : self.num_experts]
        token_idx, _ = top_c_per_expert(pool_scores.reshape(-1, pool_size, self.num_experts), k)  # [E, G*k]
        if order is not None:
            token_idx = order[token_idx]  # back to gathered rows
        token_idx = token_idx.sort(dim=1).values  # each expert's tokens in token order, as a Routing lists them
        pair_expert = torch.arange(self.num_experts, device=scores.device).repeat_interleave(token_idx.shape[1])
        owners = self.owner_counts(token_idx, len(pool_scores), pool_size, pools_in_row_order=order is None)
        routing = Routing(pair_expert, token_idx.reshape(-1), owners)
        self.record_routing(routing, len(pool_scores))
        target = None
        if predictor_logits is not None:
            pool_mask = torch.zeros_like(pool_scores).scatter_(0, token_idx.T, 1.0)  # [pool, E]
            own = slice(self.dispatch.rank * len(scores), (self.dispatch.rank + 1) * len(scores))
            target = pool_mask[own]
            pool_probs = pooled[:, self.num_experts :].reshape(-1, pool_size, self.num_experts)
            self.pending_quantile = pool_probs.topk(k, dim=1).values[:, -1].mean(dim=0)  # [E]
        return TopCDecision(self.dispatch.plan(routing, scores, self.experts), target)

    def owner_counts(self, token_idx, num_tokens: int, pool_size: int, *,
                     pools_in_row_order: bool) -> list[list[int]]:
        """[rank][expert]: how many of each expert's tokens (token_idx [E, G*k]) lie in each rank's slice of
        the gathered pool. Known from the shapes unless a pool spans ranks; then one host read."""
        ranks, per_expert = self.dispatch.size, token_idx.shape[1]
        # Every pool within one rank: k per pool, equal pools per rank.
        if pools_in_row_order and (num_tokens // ranks) % pool_size == 0:
            return [[per_expert // ranks] * self.num_experts for _ in range(ranks)]
        owner = token_idx // (num_tokens // ranks)
        return (owner.unsqueeze(-1) == torch.arange(ranks, device=owner.device)).sum(dim=1).T.tolist()

    def threshold_routing(self, tokens, scores, pool_size: int) -> Routing:
        """Inference: how many tokens each expert takes comes from the predictor and the thresholds."""
        probs = torch.sigmoid(self.predictor_logits(tokens))
        pooled = self.dispatch.gather(torch.cat([scores, probs], dim=1))
        order = self.gathered_order(len(tokens))
        if order is not None:
            pooled = pooled.index_select(0, order)
        mask = torch.cat([
            self.threshold_mask(group[:, : self.num_experts], group[:, self.num_experts :])
            for group in pooled.split(pool_size)
        ])
        if order is not None:
            mask = torch.empty_like(mask).index_copy_(0, order, mask)  # back to gathered rows
        return routing_from_mask(mask, owners=self.dispatch.size)

    def _gather_routing_inputs(self, scores, predictor_logits):
        """Router scores (and predictor probabilities) of every pool member's tokens: [pool, E or 2E].

        Only small N x E tensors travel; every rank then takes the same routing decisions."""
        routing_inputs = scores.detach()
        if predictor_logits is not None:
            probs = torch.sigmoid(predictor_logits.detach())
            routing_inputs = torch.cat([routing_inputs, probs], dim=1)
        return self.dispatch.gather(routing_inputs)

    def tokens_per_expert(self, pool_size: int) -> int:
        k = min(int(pool_size / self.num_experts * self.capacity), pool_size)
        if k < 1:
            raise ValueError(
                f"a pool of {pool_size} tokens gives experts no tokens at capacity {self.capacity} "
                f"with {self.num_experts} experts; use a larger batch or pool"
            )
        return k

    @torch.no_grad()
    def update_thresholds(self, quantile=None):
        """tau <- ema * tau + (1 - ema) * q, with q the quantile of the last training forward
        (or the given one: the trainer passes it averaged over every rank)."""
        quantile = self.pending_quantile if quantile is None else quantile
        if quantile is None:
            raise RuntimeError("update_thresholds needs a training forward first")
        self.thresholds.mul_(self.threshold_ema).add_((1 - self.threshold_ema) * quantile)
        self.pending_quantile = None

    def threshold_mask(self, scores, predictor_probs):
        """Inference routing of one pool from the predictor and the learned thresholds -> [N, E] bool mask."""
        above = predictor_probs > self.thresholds
        if self.inference_routing == "batch_independent":
            return above
        # "threshold" (the authors' rule): expert e takes as many tokens as predictor scores above
        # its threshold, choosing those with the highest router scores.
        counts = above.sum(dim=0)  # [E]
        order = scores.argsort(dim=0, descending=True, stable=True)
        take_in_order = torch.arange(scores.shape[0], device=scores.device)[:, None] < counts[None, :]
        return torch.zeros_like(above).scatter_(0, order, take_in_order)


def top_c_per_expert(pool_scores, k: int):
    """pool_scores: [G, n, E] router scores of G pools of n tokens.

    Returns (token_idx, gates), both [E, G*k]: for each expert, the flat indices (into the G*n
    tokens) of its top-k tokens in every pool, and their scores.
    """
    groups, pool_size, num_experts = pool_scores.shape
    gates, idx = pool_scores.transpose(1, 2).topk(k, dim=-1)  # [G, E, k]
    idx = idx + torch.arange(groups, device=idx.device).view(groups, 1, 1) * pool_size
    return idx.permute(1, 0, 2).reshape(num_experts, -1), gates.permute(1, 0, 2).reshape(num_experts, -1)
