"""The dense DiT feed-forward and a bank of E experts of the same shape.

Every FFN kind returns `(output, losses)`: `losses` maps a name to an unweighted scalar (empty for
dense), so blocks can treat dense and MoE layers alike.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeedForward(nn.Module):
    """DiT's MLP: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh")), {}


class Experts(nn.Module):
    """E copies of FeedForward, stored stacked so equal-sized token sets run as one batched matmul."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        # Xavier-uniform per expert, as nn.Linear layers of the dense FFN are initialised in DiT.
        bound = math.sqrt(6.0 / (dim + hidden_dim))
        nn.init.uniform_(self.w1, -bound, bound)
        nn.init.uniform_(self.w2, -bound, bound)

    def forward(self, x):
        """x: [E, M, D], expert e applied to x[e] -> [E, M, D]."""
        hidden = F.gelu(torch.baddbmm(self.b1.unsqueeze(1), x, self.w1), approximate="tanh")
        return torch.baddbmm(self.b2.unsqueeze(1), hidden, self.w2)

    def expert(self, e: int, x):
        """Expert e alone on x: [M, D] -> [M, D]."""
        hidden = F.gelu(torch.addmm(self.b1[e], x, self.w1[e]), approximate="tanh")
        return torch.addmm(self.b2[e], hidden, self.w2[e])

    def forward_masked(self, x, mask, gates):
        """Variable token sets: out[n] = sum over e with mask[n, e] of gates[n, e] * expert_e(x[n]).

        x: [N, D]; mask: [N, E] bool; gates: [N, E]. Loops over experts (counts differ per expert).
        """
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token_idx = mask[:, e].nonzero().squeeze(1)
            if token_idx.numel():
                out.index_add_(0, token_idx, gates[token_idx, e, None] * self.expert(e, x[token_idx]))
        return out


class RoutedFFN(nn.Module):
    """What every MoE FFN has: a bias-free router, the experts, an optional shared expert and the
    per-expert token counts of the last forward (for capacity statistics)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, shared_expert: bool):
        super().__init__()
        self.num_experts = num_experts
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = Experts(num_experts, dim, hidden_dim)
        self.shared_expert = FeedForward(dim, hidden_dim) if shared_expert else None
        self.last_tokens_per_expert = None
        self.last_num_tokens = 0

    def reset_router(self):
        nn.init.normal_(self.router.weight, std=0.006)

    def finish(self, x, out, tokens_per_expert):
        """Record the token counts and add the shared expert: the common tail of a forward."""
        self.last_tokens_per_expert = tokens_per_expert.detach()
        self.last_num_tokens = x.shape[0] * x.shape[1]
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)[0]
        return out

    def capacity_per_expert(self):
        """C^e = E * tokens taken by expert e / N, from the last forward."""
        return self.num_experts * self.last_tokens_per_expert.float() / self.last_num_tokens
