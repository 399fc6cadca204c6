"""DiffMoE layer: expert choice over a token pool, with a capacity predictor and dynamic thresholds.

Training: the tokens of a pool are flattened; each expert takes its top-C tokens by router score,
C = int(pool_size / E * capacity); a token's output is the score-weighted sum over the experts
that took it (0..E of them). With pool="local" the pool is the whole batch (DiffMoE); with
pool="sample" each sample is its own pool (the EC-DiT baseline, no predictor).

The capacity predictor sees the detached layer input and learns (BCE) the routing mask; per expert,
a threshold tracks the C-th largest predictor probability by EMA. At inference the predictor and
thresholds decide how many tokens each expert takes (see `inference_routing`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .experts import RoutedFFN


class DiffMoELayer(RoutedFFN):
    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        capacity: float = 1.0,
        pool: str = "local",
        use_predictor: bool = True,
        threshold_ema: float = 0.95,
        inference_routing: str = "threshold",
        shared_expert: bool = False,
    ):
        super().__init__(dim, hidden_dim, num_experts, shared_expert)
        if pool not in ("local", "sample"):
            raise ValueError(f"pool must be 'local' or 'sample', got {pool!r}")
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

    def forward(self, x):
        batch, seq, dim = x.shape
        tokens = x.reshape(-1, dim)
        scores = self.router(tokens).softmax(dim=-1)  # [N, E]
        losses = {}
        if self.training or self.inference_routing == "capacity":
            pool_size = seq if self.pool == "sample" else batch * seq
            k = self.tokens_per_expert(pool_size)
            token_idx, gates = top_c_per_expert(scores.view(-1, pool_size, self.num_experts), k)
            weighted = gates.unsqueeze(-1) * self.experts(tokens[token_idx])  # [E, G*k, D]
            out = torch.zeros_like(tokens).index_add_(0, token_idx.reshape(-1), weighted.reshape(-1, dim))
            mask = torch.zeros_like(scores).scatter_(0, token_idx.T, 1.0)  # [N, E], 1 where expert took token
            if self.training and self.predictor is not None:
                predictor_logits = self.predictor(tokens.detach())
                losses["predictor"] = F.binary_cross_entropy_with_logits(predictor_logits, mask)
                self._update_thresholds(predictor_logits.detach(), k)
            counts = torch.full((self.num_experts,), token_idx.shape[1], device=x.device)
        else:
            mask = self.threshold_mask(scores, torch.sigmoid(self.predictor(tokens)))
            out = self.experts.forward_masked(tokens, mask, scores)
            counts = mask.sum(dim=0)
        return self.finish(x, out.view(batch, seq, dim), counts), losses

    def tokens_per_expert(self, pool_size: int) -> int:
        k = min(int(pool_size / self.num_experts * self.capacity), pool_size)
        if k < 1:
            raise ValueError(
                f"a pool of {pool_size} tokens gives experts no tokens at capacity {self.capacity} "
                f"with {self.num_experts} experts; use a larger batch or pool"
            )
        return k

    @torch.no_grad()
    def _update_thresholds(self, predictor_logits, k: int):
        kth_largest = torch.sigmoid(predictor_logits).topk(k, dim=0).values[-1]  # [E]
        self.thresholds.mul_(self.threshold_ema).add_((1 - self.threshold_ema) * kth_largest)

    def threshold_mask(self, scores, predictor_probs):
        """Inference routing from the predictor and the learned thresholds -> [N, E] bool mask."""
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
