"""A sharded checkpoint as whole tensors, read from its files in one process: no ranks, no DeepSpeed engine.

What `launch/checkpoint.py consolidate` writes, and what any parallel layout then resumes from: the fp32
weights, both Adam moments and the EMA of every parameter as whole tensors (named as the trained model
names them), the Adam step, the buffers (DiffMoE thresholds) and the trainer's position, in the parts
`checkpoint.CONSOLIDATED_PARTS` names (read back by `checkpoint.read_consolidated`).

Where each piece lies in the files (DeepSpeed 0.19's layout; tests/test_consolidation.py checks every
layout against what a training process gathers itself):
- fp32 masters and moments under ZeRO 1/2 and bf16: per data-parallel rank, `*zero_pp_rank_<dp>_mp_rank_<tp>
  _optim_states.pt` holds each parameter group's flat partition (`single_partition_of_fp32_groups`,
  `base_optimizer_state`) and where each parameter's fragment lies in it (`param_slice_mappings`, written
  for DeepSpeed's universal checkpoints); the partition of rank k of the group starts at k x its size (the
  last one's master partition is saved without its padding, `group_paddings`), and a parameter starts
  where its first fragment does;
- without ZeRO (fp32): the weights are the model's (`mp_rank_<tp>_model_states.pt`, experts, whole on every
  tensor-parallel rank, in `layer_<l>_expert_<e>_mp_rank_00_model_states.pt`) and each expert-parallel shard's
  `expp_rank_<k>_mp_rank_<tp>_optim_states.pt` holds torch's optimizer state of its parameters, the k in
  the order of the shards;
- the EMA: our `trainer_rank_<r>.pt`, each rank's fragments and the buffers, copied and averaged
  (train/ema.py).
A rank r of the layout is tensor-parallel rank r % tp and data-parallel rank d = r // tp; its experts are
those of expert-parallel rank d % ep, and within their expert-data-parallel group it is rank d // ep.

Memory: one part at a time (the weights, each moment, the EMA: 4 bytes per parameter each), the shards of that
part as they are read, and the pages of the files read for it (memory-mapped, released after each part).
"""
from pathlib import Path
from typing import NamedTuple

import torch

from ..config import Config, config_from_dict
from ..models import build_model, is_moe_block
from ..parallel.tensor_parallel_plan import sharded_linears
from .checkpoint import atomic_torch_save, rank_state_name
from .ema_thresholds import whole_buffers


class Piece(NamedTuple):
    """Where a parameter of the trained (parallelized) model sits in the whole one."""
    name: str  # as the trained model names it (DiffMoE layers wrapped for DeepSpeed)
    shape: torch.Size  # the whole tensor's
    expert: bool  # split over expert-parallel ranks along dim 0
    tp_dim: int | None  # split over tensor-parallel ranks along this dim (None: whole on every TP rank)
    tp_index: list  # per TP rank, the indices along tp_dim it holds


def parallel_name(config: Config, plain: str) -> str:
    """A plain model's parameter name as the trained model has it: MoE FFNs sit in DeepSpeed's MoE wrapper."""
    parts = plain.split(".")
    if parts[0] == "blocks" and parts[2] == "ffn" and is_moe_block(config, int(parts[1])):
        return ".".join([*parts[:3], "deepspeed_moe", *parts[3:]])
    return plain


def model_pieces(config: Config, tp: int) -> list[Piece]:
    """Every parameter of the trained model in its order, with how the layout splits it."""
    with torch.device("meta"):
        model = build_model(config)
    sharded = {}
    for rank in range(tp):
        for owner, attribute, linear, column, index in sharded_linears(model, tp, rank):
            for kind in ("weight", "bias") if column else ("weight",):
                sharded.setdefault(id(getattr(linear, kind)), (0 if column or kind == "bias" else 1, []))[1].append(index)
    pieces = []
    for name, param in model.named_parameters():
        tp_dim, index = sharded.get(id(param), (None, []))
        pieces.append(Piece(parallel_name(config, name), param.shape, ".experts." in name, tp_dim, index))
    return pieces


class Files:
    """A sharded checkpoint's files, each loaded once (memory-mapped) until `release`."""

    def __init__(self, path: Path, layout: dict):
        self.path, self.loaded = path, {}
        self.tp, self.ep = layout["tp"], layout["ep"]
        self.dp = layout["world_size"] // self.tp
        self.zero = layout["zero_stage"] > 0

    def load(self, name: str):
        if name not in self.loaded:
            self.loaded[name] = torch.load(self.path / name, map_location="cpu", mmap=True, weights_only=False)
        return self.loaded[name]

    def zero_partitions(self, dp_rank: int, tp_rank: int) -> dict:
        """A data-parallel rank's ZeRO (or bf16 optimizer) state: flat partitions and fragment maps."""
        name = f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"
        if (self.path / f"bf16_{name}").exists():
            name = f"bf16_{name}"
        return self.load(name)["optimizer_state_dict"]

    def model_states(self, tp_rank: int) -> dict:
        return self.load(f"mp_rank_{tp_rank:02d}_model_states.pt")

    def release(self) -> None:
        self.loaded.clear()

    def ranks(self):
        """(global rank, tp rank, dp rank, ep rank) of every rank of the layout."""
        for rank in range(self.dp * self.tp):
            dp_rank = rank // self.tp
            yield rank, rank % self.tp, dp_rank, dp_rank % self.ep


class LocalShards:
    """Per parameter, its local shards by (tp rank, ep rank), filled from fragments as the files are read."""

    def __init__(self, pieces: list[Piece], files: Files):
        self.pieces, self.files = {piece.name: piece for piece in pieces}, files
        self.shards = {piece.name: {} for piece in pieces}

    def put(self, name: str, tp_rank: int, ep_rank: int, start: int, values: torch.Tensor) -> None:
        piece = self.pieces[name]
        if tp_rank > 0 and piece.tp_dim is None:
            return  # the same on every tensor-parallel rank: tp rank 0's copy serves
        key = (tp_rank, ep_rank if piece.expert else 0)
        if key not in self.shards[name]:
            self.shards[name][key] = torch.empty(local_shape(piece, self.files))
        self.shards[name][key].view(-1)[start:start + values.numel()] = values.reshape(-1)

    def whole(self) -> dict[str, torch.Tensor]:
        """Every parameter as the whole tensor, its shards released as it goes."""
        return {name: whole(piece, self.shards.pop(name), self.files) for name, piece in self.pieces.items()}


def local_shape(piece: Piece, files: Files) -> list[int]:
    shape = list(piece.shape)
    if piece.expert:
        shape[0] //= files.ep
    if piece.tp_dim is not None:
        shape[piece.tp_dim] = len(piece.tp_index[0])
    return shape


def whole(piece: Piece, local: dict, files: Files) -> torch.Tensor:
    """The whole tensor from its local shards by (tp rank, ep rank)."""
    def over_experts(tp_rank):
        if not piece.expert:
            return local[tp_rank, 0]
        return torch.cat([local[tp_rank, ep_rank] for ep_rank in range(files.ep)])

    if piece.tp_dim is None:
        return over_experts(0)
    result = torch.empty(piece.shape)
    for tp_rank in range(files.tp):
        result.index_copy_(piece.tp_dim, piece.tp_index[tp_rank], over_experts(tp_rank))
    return result


def read_zero(files: Files, kind: str, shards: LocalShards) -> int:
    """Masters ("params") or a moment of every parameter from the ZeRO partitions; returns Adam's step."""
    fragments, step = [], 0  # (name, tp rank, ep rank, position in the group's flat, values)
    for _, tp_rank, dp_rank, ep_rank in files.ranks():
        partitions = files.zero_partitions(dp_rank, tp_rank)
        state = partitions["base_optimizer_state"]["state"]
        for group, mapping in enumerate(partitions["param_slice_mappings"]):
            flat = partitions["single_partition_of_fp32_groups"][group] if kind == "params" else state[group][kind]
            expert = shards.pieces[next(iter(mapping))].expert
            index_in_group, shard_ep_rank = (dp_rank // files.ep, ep_rank) if expert else (dp_rank, 0)
            # Every partition has the same size; the last one's master partition is saved without its padding.
            size = len(partitions["single_partition_of_fp32_groups"][group]) + partitions["group_paddings"][group]
            partition_start = index_in_group * size
            for name, fragment in mapping.items():
                values = flat[fragment.start:fragment.start + fragment.numel]
                fragments.append((name, tp_rank, shard_ep_rank, partition_start + fragment.start, values))
            step = max(step, int(state[group]["step"]))
    # A parameter starts in its group where its first fragment does.
    offsets = {}
    for name, tp_rank, ep_rank, position, _ in fragments:
        key = (name, tp_rank, ep_rank)
        offsets[key] = min(offsets.get(key, position), position)
    for name, tp_rank, ep_rank, position, values in fragments:
        shards.put(name, tp_rank, ep_rank, position - offsets[name, tp_rank, ep_rank], values)
    return step


def read_unpartitioned(files: Files, kind: str, shards: LocalShards, config: Config) -> int:
    """Without ZeRO: the weights from the model files, a moment from torch's optimizer state of each
    expert-parallel rank; returns Adam's step."""
    names = list(shards.pieces)
    order = [n for n in names if not shards.pieces[n].expert] + [n for n in names if shards.pieces[n].expert]
    step = 0
    for tp_rank in range(files.tp):
        # One optimizer file per expert-parallel shard, named by DeepSpeed's expert-parallel rank.
        optimizer_files = sorted(files.path.glob(f"expp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt"),
                                 key=lambda path: int(path.name.split("_")[2]))
        for ep_rank, optimizer_file in enumerate(optimizer_files):
            if kind == "params":
                # Experts are whole on every tensor-parallel rank; DeepSpeed files them once, under mp rank 0.
                weights = {**files.model_states(tp_rank)["module"], **_experts_of(files, config, ep_rank)}
                for name in names:
                    shards.put(name, tp_rank, ep_rank, 0, weights[name].float())
                continue
            for index, state in files.load(optimizer_file.name)["optimizer"]["state"].items():
                shards.put(order[index], tp_rank, ep_rank, 0, state[kind])
                step = max(step, int(state["step"]))
    return step


def _experts_of(files: Files, config: Config, ep_rank: int) -> dict[str, torch.Tensor]:
    """The stacked expert weights expert-parallel rank `ep_rank` holds, from DeepSpeed's per-expert files."""
    per_rank = config.moe.num_experts // files.ep
    experts = {}
    moe_blocks = [index for index in range(config.model.depth) if is_moe_block(config, index)]
    for layer, block in enumerate(moe_blocks):
        stacked = {}
        for expert in range(ep_rank * per_rank, (ep_rank + 1) * per_rank):
            state = files.load(f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt")
            for key, tensor in state.items():
                stacked.setdefault(key.rsplit(".", 1)[1], []).append(tensor)
        for param, tensors in stacked.items():
            experts[f"blocks.{block}.ffn.deepspeed_moe.experts.{param}"] = torch.stack(tensors)
    return experts


def read_ema(files: Files, shards: LocalShards) -> dict:
    """The EMA fragments of every rank; returns rank 0's trainer state file."""
    for rank, tp_rank, _, ep_rank in files.ranks():
        ema = files.load(rank_state_name(rank))["ema"]
        for name, start, fragment in zip(ema["names"], ema["starts"], ema["shadow"]):
            shards.put(name, tp_rank, ep_rank, start, fragment)
    return files.load(rank_state_name(0))


def write_consolidated(path: Path, manifest: dict, out: Path) -> None:
    """Consolidate the sharded checkpoint at `path` into `out` (see the module docstring), one part at a time:
    weights, each moment and the EMA are each computed, written and dropped before the next."""
    config = config_from_dict(manifest["config"], source=str(path / "manifest.json"))
    files = Files(path, manifest["layout"])
    pieces = model_pieces(config, files.tp)
    steps = []
    for part, kind in (("weights", "params"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"), ("ema", "ema")):
        shards = LocalShards(pieces, files)
        if kind == "ema":
            trainer = read_ema(files, shards)
            whole_tensors = {**shards.whole(), **whole_buffers(trainer["ema"])}
        else:
            steps.append(read_zero(files, kind, shards) if files.zero else
                         read_unpartitioned(files, kind, shards, config))
            whole_tensors = shards.whole()
        atomic_torch_save(whole_tensors, out / f"{part}.pt")
        del shards, whole_tensors
        files.release()
    module = files.model_states(0)
    state = {"adam_step": max(steps), "buffers": {name: module["module"][name].float() for name in module["buffer_names"]},
             "trainer": {key: value for key, value in trainer.items() if key not in ("rng", "ema")}}
    atomic_torch_save(state, out / "state.pt")
    files.release()
