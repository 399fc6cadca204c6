"""Rows between token order and pair order, deterministically and without atomics.

A routing lists (expert, token) pairs; a token may appear in 0..E of them. Two moves connect the
token rows [N, D] with the pair rows [P, D], each the other's adjoint:

- `gather_pairs`: pair i gets its token's row (forward of the dispatch, backward of the combine);
- `sum_by_token`: each token gets the sum of its pairs' rows (forward of the combine, backward of
  the dispatch).

torch's own adjoints would sum with `index_add`, which on a GPU adds with atomics: the order of the
additions, and so the result's last bits, change from run to run. Here a sum runs over the pairs
sorted by token (`TokenOrder`, made once per routing), as one segment sum per token in expert order:
the same additions in the same order every run. On a CPU `index_add` adds in that same order
already (pairs sorted by expert, each token's in expert order), bit for bit the segment sum's result,
and is several times faster there, so the CPU keeps it. Sums of bf16/fp16 rows accumulate in fp32.
"""
from typing import NamedTuple

import torch


class TokenOrder(NamedTuple):
    pair_token: torch.Tensor  # [P] token of each pair (pairs sorted by expert)
    by_token: torch.Tensor  # [P] pair positions sorted by token, each token's in expert order
    offsets: torch.Tensor  # [N + 1] where each token's run starts in `by_token`
    num_tokens: int


def token_order(pair_token: torch.Tensor, num_tokens: int) -> TokenOrder:
    """The sort a token-order sum needs (a few small kernels, no host sync)."""
    by_token = torch.argsort(pair_token, stable=True)
    boundaries = torch.arange(num_tokens + 1, device=pair_token.device, dtype=pair_token.dtype)
    offsets = torch.searchsorted(pair_token.index_select(0, by_token), boundaries)
    return TokenOrder(pair_token, by_token, offsets, num_tokens)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def segment_sum(rows: torch.Tensor, order: TokenOrder) -> torch.Tensor:
    """[P, D] rows -> [N, D] sums per token, in the rows' dtype: one segment per token, no atomics."""
    return torch.segment_reduce(rows.index_select(0, order.by_token), "sum", offsets=order.offsets, axis=0)


def _sum(rows: torch.Tensor, order: TokenOrder, segments: bool) -> torch.Tensor:
    if not segments:  # the same additions in the same order on a CPU (see the module doc), faster there
        total = rows.new_zeros((order.num_tokens, *rows.shape[1:]))
        return total.index_add_(0, order.pair_token, rows)
    return segment_sum(rows, order)


class _SumByToken(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, order: TokenOrder, segments: bool):
        ctx.order = order
        return _sum(rows, order, segments)

    @staticmethod
    def backward(ctx, grad):
        return _GatherPairs.apply(grad, ctx.order), None, None


class _GatherPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, order: TokenOrder):
        ctx.order = order
        return tokens.index_select(0, order.pair_token)

    @staticmethod
    def backward(ctx, grad):
        wide = accumulation_dtype(grad.dtype)
        return _SumByToken.apply(grad.to(wide), ctx.order, grad.device.type != "cpu").to(grad.dtype), None


def gather_pairs(tokens: torch.Tensor, order: TokenOrder) -> torch.Tensor:
    """[N, D] -> [P, D]: each pair's token row; its gradient sums per token in fp32 (see module doc)."""
    return _GatherPairs.apply(tokens, order)


def sum_by_token(rows: torch.Tensor, order: TokenOrder, segments: bool | None = None) -> torch.Tensor:
    """[P, D] -> [N, D]: per token the sum of its pairs' rows, in the rows' dtype (pass them widened to
    accumulate wider); a token without pairs gets zeros. `segments`: sum by segments (default: off a CPU)."""
    return _SumByToken.apply(rows, order, rows.device.type != "cpu" if segments is None else segments)
