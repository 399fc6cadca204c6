"""Which slice of each attention and dense-FFN linear a tensor-parallel rank holds (plain torch: what the
tensor-parallel layers are cut by, and what reads a checkpoint's shards back into whole tensors)."""
import torch

from ..models import FeedForward
from ..models.dit import Attention


def _rank_slice(size: int, tp: int, rank: int) -> torch.Tensor:
    share = size // tp
    return torch.arange(rank * share, (rank + 1) * share)


def sharded_linears(model, tp: int, rank: int):
    """(owner module, attribute, linear, column parallel?, index) of every linear tensor parallelism shards, in
    model order: `index` holds the output rows (column parallel) or input columns (row parallel) of `rank`.
    Attention: qkv column parallel (each rank computes whole heads: its heads' q, k and v), proj row parallel;
    dense FFN: fc1 column parallel, fc2 row parallel."""
    for module in list(model.modules()):
        if isinstance(module, Attention):
            dim = module.proj.in_features
            own = _rank_slice(dim, tp, rank)  # this rank's heads' channels, in each of q, k and v
            yield module, "qkv", module.qkv, True, torch.cat([own + part * dim for part in range(3)])
            yield module, "proj", module.proj, False, own
        elif isinstance(module, FeedForward) and not _inside_moe(model, module):
            own = _rank_slice(module.fc1.out_features, tp, rank)
            yield module, "fc1", module.fc1, True, own
            yield module, "fc2", module.fc2, False, own


def _inside_moe(model, module) -> bool:
    """Whether `module` is a MoE layer's shared FFN (kept whole, as the experts)."""
    return any(module is layer.shared_ffn for layer in model.moe_layers())
