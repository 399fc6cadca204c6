"""TC-DiT baseline: each token picks its top-k experts by softmax score.

Gates are the (unnormalised) softmax scores of the chosen experts. A DeepSeek-style balance loss
sum_e f_e * P_e (f_e: E x fraction of assignments to e, P_e: mean score of e) is returned
unweighted. With capacity_factor > 0 an expert keeps at most ceil(cf * k * N / E) tokens, the
highest-scoring ones; the rest of its assignments are dropped (N: the tokens of the batch, or of each
of its pools, see `pools`).
"""
import math

import torch

from .experts import RoutedFFN, router_scores, routing_from_mask


class TokenChoiceLayer(RoutedFFN):
    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int = 2,
                 capacity_factor: float = 0.0, shared_expert: bool = False):
        super().__init__(dim, hidden_dim, num_experts, shared_expert)
        self.top_k = top_k
        self.capacity_factor = capacity_factor

    def forward(self, x):
        batch, seq, dim = x.shape
        tokens = x.reshape(-1, dim)
        scores = router_scores(self.router, tokens)  # [N, E], fp32
        topk_idx = scores.topk(self.top_k, dim=-1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, topk_idx, True)
        losses = {}
        if self.training:
            assignment_share = mask.to(scores.dtype).mean(dim=0) * self.num_experts / self.top_k
            losses["balance"] = (assignment_share * scores.mean(dim=0)).sum()
        if self.capacity_factor > 0:
            pool = self.pool_batch(batch) * seq
            mask = torch.cat([self._drop_over_capacity(m, s) for m, s in zip(mask.split(pool), scores.split(pool))])
        out = self.route(tokens, scores, routing_from_mask(mask), len(tokens))
        return self.add_shared(x, out.view(batch, seq, dim)), losses

    def _drop_over_capacity(self, mask, scores):
        num_tokens = scores.shape[0]
        limit = math.ceil(self.capacity_factor * self.top_k * num_tokens / self.num_experts)
        # Rank each expert's assigned tokens by score; unassigned tokens sort last.
        ranked = torch.where(mask, scores, torch.full_like(scores, -1.0))
        order = ranked.argsort(dim=0, descending=True, stable=True)
        within_limit = torch.arange(num_tokens, device=scores.device)[:, None] < limit
        keep = torch.zeros_like(mask).scatter_(0, order, within_limit.expand_as(mask))
        return mask & keep
