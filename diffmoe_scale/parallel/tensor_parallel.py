"""Megatron-style tensor parallelism of attention and dense FFNs through megatron-core.

Attention: qkv is column parallel (each rank computes whole heads: its heads' q, k and v),
proj is row parallel (partial sums all-reduced). Dense FFN: fc1 column parallel, fc2 row
parallel (`tensor_parallel_plan.sharded_linears` says which slice each rank holds). The sharded layers take their slices of the full layer the model was built with, so a
TP run starts from exactly the TP=1 weights. MoE experts stay whole on each TP rank (the ranks of
a TP group see the same tokens and route them identically).
"""
import torch
import torch.nn as nn
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from ..models.dit import Attention
from .groups import ParallelGroups
from .tensor_parallel_plan import sharded_linears


class ColumnLinear(ColumnParallelLinear):
    """Column-parallel linear called like nn.Linear (megatron-core returns (output, bias))."""

    def forward(self, x):
        return super().forward(x)[0]


class RowLinear(RowParallelLinear):
    def forward(self, x):
        return super().forward(x)[0]


def _shard(linear: nn.Linear, kind, index: torch.Tensor, config: ModelParallelConfig, **kwargs):
    """A `kind` parallel layer holding output rows (column parallel) or input columns (row parallel)
    `index` of `linear`. Its sharded parameters carry `tp_index`, where their slices sit in the full
    tensor along `partition_dim`, to put the full tensor back together."""
    layer = kind(linear.in_features, linear.out_features, config=config, init_method=nn.init.zeros_,
                 bias=True, skip_bias_add=False, **kwargs)
    column = kind is ColumnLinear
    index = index.to(linear.weight.device)
    with torch.no_grad():
        layer.weight.copy_(linear.weight.index_select(0 if column else 1, index))
        layer.bias.copy_(linear.bias.index_select(0, index) if column else linear.bias)
    # megatron-core marks sharded parameters only when it initialises them itself.
    sharded = [(layer.weight, 0), (layer.bias, 0)] if column else [(layer.weight, 1)]
    for param, dim in sharded:
        if not hasattr(param, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
        param.tp_index = index
    return layer


def apply_tensor_parallel(model, groups: ParallelGroups) -> None:
    """Replace attention and dense FFN linears by their shards, made on the model's device (megatron-core
    makes them on the current CUDA device, or on the CPU with `use_cpu_initialization`)."""
    tp, rank = groups.tp_size, parallel_state.get_tensor_model_parallel_rank()
    on_cpu = next(model.parameters()).device.type == "cpu"
    config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=on_cpu,
                                 perform_initialization=False, params_dtype=torch.float32)
    for owner, attribute, linear, column, index in list(sharded_linears(model, tp, rank)):
        kind, options = (ColumnLinear, {"gather_output": False}) if column else (RowLinear, {"input_is_parallel": True})
        setattr(owner, attribute, _shard(linear, kind, index, config, **options))
    for module in model.modules():
        if isinstance(module, Attention):
            module.num_heads //= tp
