"""Expert parallelism: the DiffMoE token pool spread over the EP group, experts sharded over it.

Every rank of an EP group gathers the router scores (and predictor probabilities) of the whole
pool, a few floats per token, so every rank takes the same routing decisions and knows how many
tokens it sends to and receives from each rank: no count exchange, no padding. Tokens then travel
once per selecting expert in an all-to-all with exact splits, the experts run on exactly the
tokens that chose them, and a second all-to-all brings the results home, where they are scaled by
the gate score and summed. Both all-to-alls are differentiable (the backward of an all-to-all is
the all-to-all with the splits swapped).

DeepSpeed is told the experts are MoE parameters (reduced over the expert-data-parallel group,
partitioned by ZeRO within it, saved one file per expert) by wrapping each MoE FFN in an
`deepspeed.moe.layer.MoE` subclass that carries our layer instead of DeepSpeed's gate and experts.
"""
import re
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE

from ..models import RoutedFFN
from ..models.experts import Routing, weighted_sum
from ..models.pair_rows import TokenOrder, gather_pairs, token_order
from ..models.diffmoe import DiffMoELayer
from .collectives import all_gather, average_over_ranks
from .groups import ParallelGroups


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], dispatch):
        ctx.splits, ctx.dispatch = (output_splits, input_splits), dispatch
        return dispatch.exchange(x, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad, input_splits, output_splits, ctx.dispatch), None, None, None


class ExpertParallelPlan(NamedTuple):
    send: TokenOrder  # this rank's token of each pair it sends, in expert order (so grouped by rank)
    gate_index: torch.Tensor  # those pairs' positions in this rank's flattened [N_local, E] scores
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    arrival_order: torch.Tensor  # received row i is served pair arrival_order[i] (served pairs in expert order)
    expert_order: torch.Tensor  # the inverse: served pair j is received row expert_order[j]
    counts: list[int]  # tokens of each local expert


def _runs(index: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """index[start:start + length] for each (start, length), concatenated: slices at host offsets, no sync."""
    return torch.cat([index[start:start + length] for start, length in runs])


def _offsets(sizes: list[int]) -> list[int]:
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    return starts


class ExpertParallelDispatch:
    """The pool is the EP group's tokens (rank order); this rank holds experts
    [rank * E_local, (rank + 1) * E_local). Counts the rows it moves, for the byte accounting."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank
        self.rows_sent = [0] * size  # token rows this rank sent to each rank: forward, recomputed forward, backward
        self.timed = False  # time the all-to-alls (each then waits for the device): train/timing.py sets it
        self.exchange_seconds = 0.0

    def gather(self, tensor):
        return torch.cat(all_gather(tensor, self.group))

    def plan(self, routing: Routing, scores, experts) -> ExpertParallelPlan:
        """Who sends which rows where, derived on the host from the routing every rank shares: the pairs are
        sorted by expert, then token, so expert e's pairs from rank r are one run of `owner_counts[r][e]`
        pairs; every index is a concatenation of such runs (no count exchange, no host sync)."""
        counts, me = routing.owner_counts, self.rank  # counts[owner rank][expert]
        local_tokens, local_experts, num_experts = len(scores), experts.num_experts, len(counts[0])
        mine = range(experts.first_expert, experts.first_expert + local_experts)
        expert_start = _offsets(routing.counts)
        run_start, start = [], expert_start  # run_start[owner][e]: where expert e's pairs from `owner` begin
        for owner in range(self.size):
            run_start.append(start)
            start = [a + b for a, b in zip(start, counts[owner])]
        sent_runs = [(run_start[me][e], counts[me][e]) for e in range(num_experts)]
        send_token = _runs(routing.pair_token, sent_runs) - me * local_tokens
        send_expert = _runs(routing.pair_expert, sent_runs)
        send_splits = [sum(counts[me][e] for e in range(j * local_experts, (j + 1) * local_experts))
                       for j in range(self.size)]
        recv_splits = [sum(counts[owner][e] for e in mine) for owner in range(self.size)]
        # Rows arrive by owner, then expert (each sender's order); the experts serve them by expert, then owner.
        recv_start = _offsets(recv_splits)
        arrived = {(owner, e): recv_start[owner] + sum(counts[owner][f] for f in mine if f < e)
                   for owner in range(self.size) for e in mine}
        served = {(owner, e): expert_start[e] - expert_start[mine[0]] + run_start[owner][e] - run_start[0][e]
                  for owner in range(self.size) for e in mine}
        index = torch.arange(sum(recv_splits), device=scores.device)
        expert_order = _runs(index, [(arrived[owner, e], counts[owner][e]) for e in mine for owner in range(self.size)])
        arrival_order = _runs(index, [(served[owner, e], counts[owner][e]) for owner in range(self.size) for e in mine])
        return ExpertParallelPlan(token_order(send_token, local_tokens), send_token * scores.shape[1] + send_expert,
                                  send_splits, recv_splits, arrival_order, expert_order, routing.counts[mine[0]:mine[-1] + 1])

    def combine(self, tokens, scores, plan: ExpertParallelPlan, experts):
        sent = gather_pairs(tokens, plan.send)
        received = _AllToAll.apply(sent, plan.recv_splits, plan.send_splits, self)
        expert_out = experts.forward_sorted(received.index_select(0, plan.expert_order), plan.counts)
        returning = expert_out.index_select(0, plan.arrival_order)
        returned = _AllToAll.apply(returning, plan.send_splits, plan.recv_splits, self)
        return weighted_sum(tokens, scores, plan.gate_index, plan.send, returned)

    def exchange(self, x, output_splits: list[int], input_splits: list[int]):
        """`all_to_all_single` with uneven splits (rows sent to rank j: input_splits[j]), counted."""
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        if self.timed and x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=self.group)
        if self.timed:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            self.exchange_seconds += time.perf_counter() - start
        for peer, rows in enumerate(input_splits):
            self.rows_sent[peer] += rows
        return out


class DeepSpeedMoE(MoE):
    """DeepSpeed's MoE type around one of our MoE FFNs (and nothing else).

    DeepSpeed finds MoE layers by type; this one skips `MoE.__init__`, which would build DeepSpeed's
    own gate and experts, and sets the attributes DeepSpeed reads. Its state dict lists expert e
    under `deepspeed_moe.experts.deepspeed_experts.<e>.`, the keys DeepSpeed's MoE checkpointing
    expects, while the layer keeps its experts stacked for batched matmuls.
    """

    def __init__(self, layer: RoutedFFN, groups: ParallelGroups):
        torch.nn.Module.__init__(self)
        self.deepspeed_moe = layer
        self.num_experts = layer.num_experts
        self.ep_size = groups.ep_size
        self.expert_group_name = groups.expert_group_name
        self.num_local_experts = layer.num_experts // groups.ep_size
        self.enable_expert_tensor_parallelism = False
        layer.experts.register_state_dict_post_hook(_split_experts)
        layer.experts.register_load_state_dict_pre_hook(_stack_experts)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        pass  # the engine's hook for MoE layers to make their groups: `setup_groups` made them

    def forward(self, x):
        return self.deepspeed_moe(x)


_EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


def _split_experts(module, state_dict, prefix, local_metadata):
    for name in _EXPERT_PARAMS:
        stacked = state_dict.pop(prefix + name)
        for e in range(len(stacked)):
            state_dict[f"{prefix}deepspeed_experts.{e}.{name}"] = stacked[e].clone()  # alone: a view saves the whole stack


def _stack_experts(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    pattern = re.compile(re.escape(prefix) + r"deepspeed_experts\.(\d+)\.(\w+)$")
    per_expert = {}
    for key in [k for k in state_dict if pattern.match(k)]:
        e, name = pattern.match(key).groups()
        per_expert.setdefault(name, {})[int(e)] = state_dict.pop(key)
    for name, tensors in per_expert.items():
        state_dict[prefix + name] = torch.stack([tensors[e] for e in sorted(tensors)])


def apply_expert_parallel(model, groups: ParallelGroups) -> None:
    """Shard every MoE FFN's experts over the EP group, route its pool through the group, and
    mark the experts as DeepSpeed MoE parameters. The model must be initialised identically on
    every rank (same seed): each rank keeps its slice of the same experts."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, RoutedFFN):
                continue
            if groups.ep_size > 1:
                if not isinstance(child, DiffMoELayer):
                    raise ValueError(f"{type(child).__name__} does not support expert parallelism (parallel.ep > 1)")
                local = child.num_experts // groups.ep_size
                child.experts.narrow_(groups.ep_rank * local, local)
                child.dispatch = ExpertParallelDispatch(groups.ep_group, groups.ep_size, groups.ep_rank)
            for param in child.experts.parameters():
                param.allreduce = False  # DeepSpeed: reduce over the expert-data-parallel group only
                param.group_name = groups.expert_group_name
            setattr(parent, child_name, DeepSpeedMoE(child, groups))


def rows_sent_to_other_ranks(model) -> int:
    """Token rows this rank's all-to-alls have sent to other ranks so far (both trips; forward, recomputed
    forward and backward)."""
    total = 0
    for layer in model.moe_layers():
        if isinstance(layer.dispatch, ExpertParallelDispatch):
            total += sum(layer.dispatch.rows_sent) - layer.dispatch.rows_sent[layer.dispatch.rank]
    return total


def predictor_layers(model) -> list[DiffMoELayer]:
    return [layer for layer in model.moe_layers() if isinstance(layer, DiffMoELayer) and layer.predictor is not None]


def take_pending_quantiles(model):
    """[layers, E] threshold quantiles the last forward recorded (0 without predictor layers); clears them.
    Called once per micro-batch after its backward, so a recomputed forward cannot count twice."""
    layers = predictor_layers(model)
    if not layers:
        return 0
    quantiles = torch.stack([layer.pending_quantile.float() for layer in layers])
    for layer in layers:
        layer.pending_quantile = None
    return quantiles


@torch.no_grad()
def apply_threshold_quantiles(model, quantiles) -> None:
    """Update every predictor layer's thresholds with its quantile averaged over all ranks, so every
    rank holds the same tau (an EP group agrees on its pool's quantile; DP replicas average theirs)."""
    layers = predictor_layers(model)
    if not layers:
        return
    for layer, quantile in zip(layers, average_over_ranks(quantiles)):
        layer.update_thresholds(quantile)
