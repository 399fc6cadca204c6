"""The dense DiT feed-forward, a bank of experts of the same shape, and how tokens reach them.

Every FFN kind returns `(output, losses)`: `losses` maps a name to an unweighted scalar (empty for
dense), so blocks can treat dense and MoE layers alike.

Routing is described by a `Routing`: (expert, token) pairs of the pool sorted by expert, then token. A
dispatch object turns a routing into a `plan` for this process once (index tensors, split sizes:
everything a recomputed forward can reuse) and `combine`s by the plan: it runs the pairs through the
experts and returns the gate-weighted sum per token (deterministic, accumulated in fp32: pair_rows.py).
`LocalDispatch` (one process holds the pool and every expert) is the default; `diffmoe_scale.parallel`
swaps in one that spreads pool and experts over ranks.

Host syncs: the sizes of expert batches and all-to-all splits must be known on the host. Training's
expert choice knows them from shapes alone (k tokens per expert and pool); only a pool spread over
ranks reads, once per layer, how many of each expert's tokens each rank holds. Routing from a mask
(inference, token choice) reads its counts once. tests/test_host_syncs.py holds the budget.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pair_rows import TokenOrder, accumulation_dtype, gather_pairs, sum_by_token, token_order


class FeedForward(nn.Module):
    """DiT's MLP: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh")), {}


class Experts(nn.Module):
    """Experts `first_expert .. first_expert + num_experts - 1` of a layer, each FeedForward's shape,
    stored stacked so equal-sized token sets run as one batched matmul."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.num_experts = num_experts
        self.first_expert = 0
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        # Xavier-uniform per expert, as nn.Linear layers of the dense FFN are initialised in DiT.
        bound = math.sqrt(6.0 / (dim + hidden_dim))
        nn.init.uniform_(self.w1, -bound, bound)
        nn.init.uniform_(self.w2, -bound, bound)

    def narrow_(self, first: int, count: int) -> "Experts":
        """Keep only experts first .. first + count - 1 (this rank's shard of the layer)."""
        for name in ("w1", "b1", "w2", "b2"):
            setattr(self, name, nn.Parameter(getattr(self, name).data[first : first + count].clone()))
        self.first_expert += first
        self.num_experts = count
        return self

    def forward(self, x):
        """x: [E, M, D], expert e applied to x[e] -> [E, M, D]."""
        hidden = F.gelu(torch.baddbmm(self.b1.unsqueeze(1), x, self.w1), approximate="tanh")
        return torch.baddbmm(self.b2.unsqueeze(1), hidden, self.w2)

    def expert(self, e: int, x):
        """Expert e (local index) alone on x: [M, D] -> [M, D]."""
        hidden = F.gelu(torch.addmm(self.b1[e], x, self.w1[e]), approximate="tanh")
        return torch.addmm(self.b2[e], hidden, self.w2[e])

    def forward_sorted(self, x, counts: list[int]):
        """x: [sum(counts), D], the tokens of local expert 0 first, then expert 1, ...

        One batched matmul when every expert has the same count (training). Otherwise, without
        gradients (inference routing) on a GPU in bf16, one grouped GEMM per weight (torch's grouped_mm
        kernels; with gradients their row-gathered biases would sum their gradients in bf16: on an
        H200 20x the error of the loop's), and a loop over the experts elsewhere.
        """
        if len(set(counts)) == 1:
            return self(x.view(self.num_experts, counts[0], x.shape[-1])).view(x.shape)
        if x.is_cuda and x.dtype == torch.bfloat16 and not torch.is_grad_enabled() and hasattr(F, "grouped_mm"):
            return self._grouped(x, counts)
        chunks = x.split(counts)
        return torch.cat([self.expert(e, chunk) for e, chunk in enumerate(chunks)])

    def _grouped(self, x, counts: list[int]):
        # Pinned and non-blocking: a blocking copy from pageable memory would wait for the device's queue.
        sizes = torch.tensor(counts).pin_memory().to(x.device, non_blocking=True)
        ends = sizes.cumsum(0).to(torch.int32)
        row_expert = torch.repeat_interleave(torch.arange(self.num_experts, device=x.device), sizes,
                                             output_size=len(x))
        hidden = F.gelu(F.grouped_mm(x, self.w1, offs=ends) + self.b1.index_select(0, row_expert), approximate="tanh")
        return F.grouped_mm(hidden, self.w2, offs=ends) + self.b2.index_select(0, row_expert)


class Routing(NamedTuple):
    """(expert, token) pairs of a pool sorted by expert, then token: expert `pair_expert[i]` takes token
    `pair_token[i]`. `owner_counts[r][e]`: how many of expert e's pairs have their token in the r-th of
    `len(owner_counts)` equal slices of the pool (the ranks of a dispatch, in order), so expert e's pairs
    are one run per slice. A host list: it sizes the expert batches and the all-to-all."""
    pair_expert: torch.Tensor
    pair_token: torch.Tensor
    owner_counts: list[list[int]]

    @property
    def counts(self) -> list[int]:
        """Tokens of each expert."""
        return [sum(column) for column in zip(*self.owner_counts)]


def routing_from_mask(mask, owners: int = 1) -> Routing:
    """[N, E] bool routing mask -> its Routing (`owners`: slices of the pool for `owner_counts`).
    One host read: the counts."""
    num_tokens, num_experts = mask.shape
    per_owner = mask.view(owners, num_tokens // owners, num_experts).sum(dim=1)  # [owners, E]
    owner_counts = per_owner.tolist()  # the one host sync
    counts = [sum(column) for column in zip(*owner_counts)]
    taken_first = (~mask).T.to(torch.uint8).argsort(dim=1, stable=True)  # [E, N]: each expert's tokens, in order
    pair_token = torch.cat([taken_first[e, :count] for e, count in enumerate(counts)])
    pair_expert = torch.arange(num_experts, device=mask.device).repeat_interleave(
        per_owner.sum(dim=0), output_size=len(pair_token))
    return Routing(pair_expert, pair_token, owner_counts)


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype routing computes in: fp32 for a bf16/fp16 model (no low-precision ties or rounding in
    top-C, the gates or the predictor), the model's own where that is wider."""
    return torch.promote_types(dtype, torch.float32)


class _WideLinear(torch.autograd.Function):
    """x @ weight.T + bias computed in a wider dtype than x and weight hold (bf16 -> fp32), keeping only x and
    weight for backward: F.linear on upcast copies would keep an fp32 copy of x, twice the bytes."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype, ctx.dtype = None if bias is None else bias.dtype, dtype
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight.to(ctx.dtype)).to(x.dtype)
        grad_weight = (grad.flatten(0, -2).T @ x.flatten(0, -2).to(ctx.dtype)).to(weight.dtype)
        grad_bias = None if ctx.bias_dtype is None else grad.flatten(0, -2).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None


def wide_linear(x, weight, bias=None):
    """A linear layer in the routing dtype (see `routing_dtype`) of bf16/fp16 inputs; plain F.linear otherwise."""
    dtype = routing_dtype(x.dtype)
    if dtype == x.dtype and dtype == weight.dtype:
        return F.linear(x, weight, bias)
    return _WideLinear.apply(x, weight, bias, dtype)


def router_scores(router: nn.Linear, tokens):
    """Softmax router scores [N, E] in the routing dtype."""
    return wide_linear(tokens, router.weight).softmax(dim=-1)


def weighted_sum(tokens, scores, gate_index, order: TokenOrder, expert_out):
    """out[n] = sum over pairs (e, n) of scores[n, e] * expert_out[pair]: the gate-weighted combine,
    accumulated in the scores' (routing) dtype, at least fp32, without atomics (pair_rows.py), and returned
    in the tokens' dtype. `gate_index`: each pair's position in the flattened scores.

    Gathers use index_select (or pair_rows) rather than advanced indexing, here and in the dispatches: their
    backward is deterministic, while advanced indexing's backward adds with atomics on CPU threads (gradients
    would vary run to run)."""
    wide = accumulation_dtype(scores.dtype)
    gates = scores.flatten().index_select(0, gate_index).unsqueeze(1).to(wide)
    return sum_by_token(gates * expert_out.to(wide), order).to(tokens.dtype)


class LocalPlan(NamedTuple):
    order: TokenOrder  # the pairs' tokens (pool rows, sorted by expert) and their token-order sort
    gate_index: torch.Tensor  # each pair's position in the flattened [N, E] scores
    counts: list[int]


class LocalDispatch:
    """The pool is this process's tokens and every expert is here."""

    size = 1
    rank = 0

    def gather(self, tensor):
        """Rows of every pool member, in rank order (here: this process's rows)."""
        return tensor

    def plan(self, routing: Routing, scores, experts: Experts) -> LocalPlan:
        gate_index = routing.pair_token * scores.shape[1] + routing.pair_expert
        return LocalPlan(token_order(routing.pair_token, len(scores)), gate_index, routing.counts)

    def combine(self, tokens, scores, plan: LocalPlan, experts: Experts):
        """sum over pairs of scores[token, expert] * expert(token), per token: [N, D]."""
        expert_out = experts.forward_sorted(gather_pairs(tokens, plan.order), plan.counts)
        return weighted_sum(tokens, scores, plan.gate_index, plan.order, expert_out)


class RoutedFFN(nn.Module):
    """What every MoE FFN has: a bias-free router, the experts, an optional shared FFN, the dispatch
    and the per-expert token counts of the last forward (for capacity statistics)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, shared_expert: bool):
        super().__init__()
        self.num_experts = num_experts
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = Experts(num_experts, dim, hidden_dim)
        # Not called "shared_expert": DeepSpeed files every parameter whose name holds "expert" per expert.
        self.shared_ffn = FeedForward(dim, hidden_dim) if shared_expert else None
        self.dispatch = LocalDispatch()
        self.last_pairs = None  # (pair_expert, pair_token) of the last forward's pool
        self.last_tokens_per_expert = None
        self.last_num_tokens = 0
        self.batch_pools = 1  # equal parts of each rank's batch that are pools of their own (see pools.py)

    def reset_router(self):
        nn.init.normal_(self.router.weight, std=0.006)

    def static_routing(self) -> bool:
        """Whether every expert's token count follows from the input's shape alone (no count read from the
        routing): what one compiled graph of fixed shapes can hold. False here (token choice's counts)."""
        return False

    def route(self, tokens, scores, routing: Routing, pool_tokens: int):
        """Run `routing` through the experts (see `record_routing` for the statistics it keeps)."""
        self.record_routing(routing, pool_tokens)
        return self.dispatch.combine(tokens, scores, self.dispatch.plan(routing, scores, self.experts), self.experts)

    def record_routing(self, routing: Routing, pool_tokens: int) -> None:
        """Keep the pool's routing of this forward for the capacity statistics."""
        self.last_pairs = (routing.pair_expert, routing.pair_token)
        self.last_tokens_per_expert = torch.tensor(routing.counts)
        self.last_num_tokens = pool_tokens

    def pool_batch(self, batch: int) -> int:
        """Samples of each rank's batch in one pool part (see `batch_pools`)."""
        if batch % self.batch_pools:
            raise ValueError(f"a batch of {batch} does not split into {self.batch_pools} pools")
        return batch // self.batch_pools

    def add_shared(self, x, out):
        """The common tail of a forward: plus the shared FFN of the input, where there is one."""
        return out if self.shared_ffn is None else out + self.shared_ffn(x)[0]

    def experts_per_token(self, local_tokens: int) -> torch.Tensor:
        """[local_tokens]: how many experts took each of this rank's tokens in the last forward (the pool
        holds the dispatch group's tokens in rank order)."""
        pair_token = self.last_pairs[1]
        counts = torch.zeros(self.last_num_tokens, dtype=torch.long, device=pair_token.device)
        counts.index_add_(0, pair_token, torch.ones_like(pair_token))  # bincount would sync with the device
        start = self.dispatch.rank * local_tokens
        return counts[start:start + local_tokens]

    def capacity_per_expert(self):
        """C^e = E * tokens taken by expert e / N (N: tokens in the pool), from the last forward."""
        return self.num_experts * self.last_tokens_per_expert.float() / self.last_num_tokens
