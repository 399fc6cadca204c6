"""Memory and communication of one rank of a training layout, from the config alone.

Everything is in bytes per rank. Memory:
- model state as our DeepSpeed engine allocates it (contiguous gradients, reduce-scatter, the
  bucket sizes and overlap of `parallel.*`; see parallel/engine.py): the parameters in the training
  precision, their fp32 gradients, ZeRO's reduce buckets, fp32 master weights, Adam's two fp32
  moments, and the trainer's fp32 EMA copy. ZeRO 1/2 partition dense parameters' optimizer state
  over the data-parallel group and expert parameters' over the expert-data-parallel group; ZeRO 2
  also partitions the gradients;
- activations: what one micro-batch's forward keeps for backward, op by op (the `_activation_*`
  functions say which op keeps what), with and without activation checkpointing;
- the peak of a step (`peak_bytes`).
Communication: bytes the rank sends per optimizer step in the MoE all-to-alls, the routing
all-gather, the gradient reduction and tensor parallelism, for ring algorithms (an all-reduce of
X bytes over n ranks sends 2(n-1)/n X per rank, a reduce-scatter or all-gather (n-1)/n X).

`estimate_check.measure` counts the same quantities on real training steps (tests/test_estimate.py
compares them).
"""
import itertools
from dataclasses import asdict, dataclass

import torch

from .config import Config, ConfigError
from .models import FeedForward, RoutedFFN, build_model, is_moe_block
from .models.dit import Attention
from .parallel.groups import check_layout

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4
INDEX = 8  # int64 routing indices
# ZeRO 1/2 allocate a reduce bucket (parallel.reduce_bucket_size elements) in the training precision at
# each backward and free it after the reduction; with overlap_comm two (one fills while the other is
# reduced), as the engine's census counts them (tests/test_estimate.py).
OVERLAP_BUCKETS = 2
TIMESTEP_FREQUENCIES = 256  # input width of the timestep MLP (TimestepEmbedder)
# Values the loss keeps per latent value: flow's squared error keeps the difference; DDPM's
# learned-variance bound keeps about 18 intermediates (counted with saved-tensor hooks).
LOSS_VALUES = {"flow": 1, "ddpm": 18}
# "flash": the fused kernels (FlashAttention and memory-efficient on GPUs, the flash kernel on CPU) keep
# q, k, v, the output and a log-sum-exp per query; "math" keeps the softmax matrix instead.
ATTENTION_BACKENDS = ("flash", "math")


@dataclass(frozen=True)
class Layout:
    """How a config's training runs on its ranks: what the estimate depends on besides the model."""
    world_size: int
    tp: int
    dp: int
    ep: int
    zero_stage: int
    precision: str
    micro_batch: int  # images per rank and micro-batch
    grad_accum: int
    checkpoint_every: int  # 0: no activation checkpointing
    attention: str
    overlap_comm: bool = False
    reduce_bucket: int = 50_000_000  # elements
    allgather_bucket: int = 50_000_000

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same expert shard (they average its gradients)."""
        return self.dp // self.ep


def layout_of(config: Config, world_size: int | None = None, attention: str = "flash") -> Layout:
    """The layout of `config` on `world_size` ranks (default: one EP group, ep x tp ranks)."""
    parallel, train = config.parallel, config.train
    world_size = parallel.ep * parallel.tp if world_size is None else world_size
    if world_size < 1:
        raise ConfigError(f"world size: must be at least 1, got {world_size}")
    if attention not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention: must be one of {list(ATTENTION_BACKENDS)}, got {attention!r}")
    check_layout(config, world_size)
    dp = world_size // parallel.tp
    return Layout(
        world_size=world_size, tp=parallel.tp, dp=dp, ep=parallel.ep, zero_stage=parallel.zero_stage,
        precision=train.precision, micro_batch=train.global_batch_size // (dp * train.grad_accum_steps),
        grad_accum=train.grad_accum_steps,
        checkpoint_every=parallel.activation_checkpointing_every if parallel.activation_checkpointing else 0,
        attention=attention, overlap_comm=parallel.overlap_comm, reduce_bucket=parallel.reduce_bucket_size,
        allgather_bucket=parallel.allgather_bucket_size,
    )


# ----------------------------------------------------------------------------------------------
# Parameters


PARAMETER_KINDS = ("replicated", "tensor_parallel", "routing", "experts")


@dataclass(frozen=True)
class Parameters:
    """The model's parameter sizes in registration order (the order of DeepSpeed's flat groups), each
    with how the ranks hold it: "replicated" (embeddings, adaLN, final layer, row-parallel biases,
    shared experts), "tensor_parallel" (attention and dense FFN weights, split over the TP group),
    "routing" (routers and capacity predictors, replicated), "experts" (split over the EP group)."""
    sizes: tuple[tuple[str, int], ...]

    def count(self, kind: str) -> int:
        return sum(numel for k, numel in self.sizes if k == kind)

    def per_rank(self, layout: Layout) -> tuple[list[int], list[int]]:
        """This rank's (dense, expert) parameter sizes, in order: DeepSpeed's two optimizer groups."""
        dense = [numel // layout.tp if kind == "tensor_parallel" else numel for kind, numel in self.sizes
                 if kind != "experts"]
        return dense, [numel // layout.ep for kind, numel in self.sizes if kind == "experts"]


def count_parameters(config: Config) -> Parameters:
    """Read off the model itself, built on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        model = build_model(config)
    kinds = {}
    moe_layers = model.moe_layers()
    for module in model.modules():
        if isinstance(module, RoutedFFN):
            kinds |= {id(p): "experts" for p in module.experts.parameters()}
            routing = [module.router] + ([module.predictor] if getattr(module, "predictor", None) else [])
            kinds |= {id(p): "routing" for part in routing for p in part.parameters()}
        # As parallel/tensor_parallel.py shards them: column-parallel weight and bias, row-parallel
        # weight (its bias stays whole); a MoE layer's shared FFN stays whole.
        elif isinstance(module, Attention):
            kinds |= {id(p): "tensor_parallel" for p in (module.qkv.weight, module.qkv.bias, module.proj.weight)}
        elif isinstance(module, FeedForward) and not any(module is layer.shared_ffn for layer in moe_layers):
            kinds |= {id(p): "tensor_parallel" for p in (module.fc1.weight, module.fc1.bias, module.fc2.weight)}
    return Parameters(tuple((kinds.get(id(p), "replicated"), p.numel()) for p in model.parameters()))


# ----------------------------------------------------------------------------------------------
# Model state


def zero_partition(sizes: list[int], ranks: int) -> tuple[int, int]:
    """(partition, gradient partition) elements of the largest ZeRO 1/2 partition of one optimizer group.

    DeepSpeed flattens the group, pads it to a multiple of 2 x ranks and gives each rank an equal
    slice: the slice of the fp32 master weights and Adam moments. ZeRO 2 keeps the gradients of every
    parameter that touches the slice whole, so the parameters cut by its ends count in full."""
    partition = -(-sum(sizes) // (2 * ranks)) * 2
    starts = list(itertools.accumulate(sizes, initial=0))
    gradients = max(sum(numel for start, numel in zip(starts, sizes)
                        if start < (rank + 1) * partition and start + numel > rank * partition)
                    for rank in range(ranks))
    return partition, gradients


def bucket_bytes(layout: Layout) -> int:
    """ZeRO 1/2's reduce buckets during the backward (the all-gather bucket serves the parameter update,
    after the backward's peak)."""
    if not layout.zero_stage:
        return 0
    return layout.reduce_bucket * PRECISION_BYTES[layout.precision] * (OVERLAP_BUCKETS if layout.overlap_comm else 1)


MODEL_STATE_KINDS = ("parameters", "gradients", "reduce_bucket", "master_weights", "optimizer_state", "ema")


def model_state_bytes(params: Parameters, layout: Layout) -> dict[str, int]:
    """What DeepSpeed and the trainer hold per rank besides activations (see the module docstring).

    Gradients: fp32 (bf16 accumulates and reduces them in fp32, parallel/precision.py), the whole local
    model except under ZeRO 2 (ZeRO 1 reduces them into a partition only after the backward). The reduce bucket exists from the start of each
    backward until its reduction. Master weights: fp32, unless the parameters are fp32 and ZeRO is
    off; ZeRO 1/2 keep an fp32 copy of the partition even for fp32 parameters."""
    width = PRECISION_BYTES[layout.precision]
    groups = [(sizes, ranks) for sizes, ranks in zip(params.per_rank(layout), (layout.dp, layout.expert_dp))
              if sizes]
    local = sum(sum(sizes) for sizes, _ in groups)
    if layout.zero_stage == 0:
        partition = gradients = local
    else:
        partitions = [zero_partition(sizes, ranks) for sizes, ranks in groups]
        partition = sum(p for p, _ in partitions)
        gradients = sum(g for _, g in partitions) if layout.zero_stage == 2 else local
    has_master = layout.zero_stage > 0 or layout.precision != "fp32"
    # The EMA is sharded as the masters are: ZeRO's partition, or without ZeRO an equal share of each
    # parameter among the ranks holding copies of it (train/ema.py).
    ema = partition if layout.zero_stage else sum(-(-size // ranks) for sizes, ranks in groups for size in sizes)
    return {
        "parameters": local * width,
        "gradients": gradients * FP32,
        "reduce_bucket": bucket_bytes(layout),
        "master_weights": partition * FP32 if has_master else 0,
        "optimizer_state": 2 * partition * FP32,
        "ema": ema * FP32,
    }


# ----------------------------------------------------------------------------------------------
# Activations: what one micro-batch's forward keeps for backward (autograd's saved tensors and, in
# checkpointed blocks, the routing decisions)


def tokens_per_image(config: Config) -> int:
    return (config.model.input_size // config.model.patch_size) ** 2


def micro_batch_tokens(config: Config, layout: Layout) -> int:
    """Tokens of one rank's micro-batch."""
    return layout.micro_batch * tokens_per_image(config)


def pairs_per_rank(config: Config, layout: Layout) -> float:
    """(token, expert) pairs per MoE layer and forward for one rank's tokens (and served by its experts).

    Expert choice: each expert takes k = int(pool / E * capacity) tokens of every pool; a rank's
    tokens are tokens / pool of a pool's worth. Token choice: top_k per token (at most: a capacity
    factor drops some)."""
    moe, tokens = config.moe, micro_batch_tokens(config, layout)
    if moe.ffn == "token_choice":
        return moe.top_k * tokens
    pool = {"ep_group": layout.ep * tokens, "local": tokens, "sample": tokens_per_image(config)}[moe.pool]
    per_expert = min(int(pool / moe.num_experts * moe.capacity), pool)
    return moe.num_experts * per_expert * tokens / pool


def _activation_attention(config: Config, layout: Layout) -> int:
    """Per token: norm1's input, its output (kept by the modulation's multiply), the modulated norm
    (qkv's input), the attention core, the projection's output (kept by the gate multiply), and norm1's
    mean and rstd (fp32 on GPUs)."""
    width, dim = PRECISION_BYTES[layout.precision], config.model.hidden_size
    heads = config.model.num_heads // layout.tp
    # flash: q, k, v (one qkv storage) and the output, which is the projection's input; math: scaled
    # copies of q and k, a contiguous v, the softmax matrix and the projection's input.
    core = 4 * dim // layout.tp * width
    core += heads * FP32 if layout.attention == "flash" else heads * tokens_per_image(config) * width
    return 4 * dim * width + core + 2 * FP32


def _activation_dense_ffn(config: Config, layout: Layout) -> int:
    """Per token: norm2's input, its output (kept by the modulation's multiply), the modulated norm
    (fc1's input), fc1's output (GELU's input), GELU's output (fc2's input), the FFN output (kept by the
    gate multiply), norm2's statistics."""
    width, dim, hidden = PRECISION_BYTES[layout.precision], config.model.hidden_size, config.model.ffn_width
    return (4 * dim + 2 * hidden // layout.tp) * width + 2 * FP32


def _activation_moe_ffn(config: Config, layout: Layout) -> int:
    """Per token, the MoE FFN's share (the pairs' share comes from `pairs_per_rank`)."""
    moe, width = config.moe, PRECISION_BYTES[layout.precision]
    dim, hidden, experts = config.model.hidden_size, config.model.ffn_width, moe.num_experts
    tokens = micro_batch_tokens(config, layout)
    # norm2's input and output, the modulated norm (the router's and predictor's input), the layer
    # output; in fp32 (routing runs in fp32), the softmax scores, the predictor's hidden layer (SiLU's
    # input and output), its logits and the BCE target.
    per_token = 4 * dim * width + experts * FP32 + 2 * FP32
    if moe.ffn == "diffmoe":
        per_token += (2 * dim + experts) * FP32 + _predictor_target(config, layout) // tokens
    if moe.shared_expert:
        per_token += 2 * hidden * width
    # Per pair: the expert's input, GELU's input and output; in fp32 (the combine accumulates in fp32) the
    # returned output, the gated output (index_add keeps its source) and the gate; the routing indices.
    per_pair = (dim + 2 * hidden) * width + (2 * dim + 1) * FP32 + _routing_indices(layout) * INDEX
    return round(per_token * tokens + per_pair * pairs_per_rank(config, layout))


def _routing_indices(layout: Layout) -> int:
    """int64 indices per pair of a dispatch plan: the token and the gate's position in the scores, and
    with expert parallelism the arrival order both ways."""
    return 4 if layout.ep > 1 else 2


def _routing_decision(config: Config, layout: Layout) -> int:
    """What a checkpointed MoE block keeps besides its input (models/routing_tape.py): the dispatch
    plan's indices and the predictor's target, for the recomputation to replay (token choice routes
    again instead)."""
    if config.moe.ffn == "token_choice":
        return 0
    target = _predictor_target(config, layout) if config.moe.ffn == "diffmoe" else 0
    return round(pairs_per_rank(config, layout) * _routing_indices(layout) * INDEX) + target


def _predictor_target(config: Config, layout: Layout) -> int:
    """The capacity predictor's BCE target: this rank's rows of the routing mask, a view that keeps
    the mask of the whole gathered pool (ep x the rank's tokens) alive."""
    tokens = layout.ep * micro_batch_tokens(config, layout)
    return tokens * config.moe.num_experts * FP32


def _activation_block(config: Config, layout: Layout, moe: bool) -> int:
    """One block: the per-token parts, plus per sample the adaLN MLP's input, its output (the gates
    are views of it) and the two (1 + scale)."""
    width, dim = PRECISION_BYTES[layout.precision], config.model.hidden_size
    tokens = micro_batch_tokens(config, layout)
    ffn = _activation_moe_ffn(config, layout) if moe else _activation_dense_ffn(config, layout) * tokens
    return _activation_attention(config, layout) * tokens + ffn + 9 * dim * width * layout.micro_batch


def _activation_outside_blocks(config: Config, layout: Layout) -> int:
    """Patch embedding's input, the final layer (norm input, modulated norm, linear input), the loss (fp32:
    the prediction comes back in fp32); per sample the conditioning c (shared by every adaLN), the timestep
    MLP, the final adaLN, the labels."""
    model, width = config.model, PRECISION_BYTES[layout.precision]
    latent_values = model.patch_size ** 2 * model.in_channels
    per_token = (latent_values + 3 * model.hidden_size) * width + latent_values * LOSS_VALUES[
        config.diffusion.objective] * FP32
    per_sample = (TIMESTEP_FREQUENCIES + 5 * model.hidden_size) * width + INDEX
    return (per_token + 2 * FP32) * micro_batch_tokens(config, layout) + per_sample * layout.micro_batch


def activation_bytes(config: Config, layout: Layout) -> dict[str, int]:
    """Activations of one micro-batch. A checkpointed block keeps only its input (and a MoE block its
    routing decision); in backward it recomputes its forward, so one block's activations come on top
    while it runs (`recompute`)."""
    width = PRECISION_BYTES[layout.precision]
    block_input = micro_batch_tokens(config, layout) * config.model.hidden_size * width
    stored, recompute = _activation_outside_blocks(config, layout), 0
    for index in range(config.model.depth):
        moe = is_moe_block(config, index)
        full = _activation_block(config, layout, moe)
        if is_checkpointed(layout, index):
            kept = block_input + (_routing_decision(config, layout) if moe else 0)
            stored, recompute = stored + kept, max(recompute, full)
        else:
            stored += full
    return {"activations": stored, "recompute": recompute}


def is_checkpointed(layout: Layout, block_index: int) -> bool:
    return layout.checkpoint_every > 0 and block_index % layout.checkpoint_every == 0


# ----------------------------------------------------------------------------------------------
# Communication: bytes one rank sends per optimizer step


def communication_bytes(config: Config, layout: Layout, params: Parameters) -> dict[str, int]:
    width, dim, depth = PRECISION_BYTES[layout.precision], config.model.hidden_size, config.model.depth
    tokens = micro_batch_tokens(config, layout)
    moe_blocks = [i for i in range(depth) if is_moe_block(config, i)]
    # Forwards of the MoE layers per micro-batch: each once, and again when its block is recomputed.
    moe_forwards = sum(2 if is_checkpointed(layout, i) else 1 for i in moe_blocks)
    # All-to-all: a pair whose expert is on another rank sends the token there and the result back in
    # every forward; the backward sends the two gradients the same way once.
    remote_pairs = pairs_per_rank(config, layout) * (layout.ep - 1) / layout.ep
    all_to_all = 2 * remote_pairs * dim * width * (moe_forwards + len(moe_blocks))
    # Routing all-gather: the pool's router scores (and predictor probabilities), E fp32 values per token
    # each, once per forward (a recomputation replays the routing: models/routing_tape.py).
    routing_values = config.moe.num_experts * (2 if config.moe.ffn == "diffmoe" else 1)
    all_gather = (layout.ep - 1) * tokens * routing_values * FP32 * len(moe_blocks)
    # Tensor parallelism: an all-reduce of [tokens, D] after each row-parallel layer in forward (attention
    # projection, dense fc2), and of each column-parallel layer's input gradient in backward (qkv, dense fc1).
    all_reduces = sum((1 + (not is_moe_block(config, i))) * (3 if is_checkpointed(layout, i) else 2)
                      for i in range(depth))
    tensor_parallel = 2 * (layout.tp - 1) / layout.tp * tokens * dim * width * all_reduces
    dense, experts = (sum(sizes) for sizes in params.per_rank(layout))
    return {
        "moe_all_to_all": round(all_to_all * layout.grad_accum),
        "routing_all_gather": round(all_gather * layout.grad_accum),
        "gradient_reduction": round(_reduction(dense, layout.dp, layout)
                                    + _reduction(experts, layout.expert_dp, layout)),
        "tensor_parallel": round(tensor_parallel * layout.grad_accum),
    }


def _reduction(count: int, ranks: int, layout: Layout) -> float:
    """Gradient reduction of `count` parameters over `ranks`: an all-reduce (ZeRO 0); a reduce-scatter,
    then an all-gather of the updated partition (ZeRO 1); the same with a reduce-scatter per
    micro-batch (ZeRO 2). ZeRO 0 and 1 reduce once per step. Gradients travel in fp32, the updated
    parameters in the training precision."""
    reduce_scatters = layout.grad_accum if layout.zero_stage == 2 else 1
    return (ranks - 1) / ranks * count * (reduce_scatters * FP32 + PRECISION_BYTES[layout.precision])


# ----------------------------------------------------------------------------------------------
# All of it


def peak_bytes(memory: dict[str, int]) -> int:
    """The largest memory of a step: the persistent state and the reduce bucket, plus the larger of
    the activations and the gradients (the backward frees the first as it makes the second), plus a
    recomputed block. On an H200, a plain bf16 forward and backward of DiffMoE-L-E8 (32 images) peaked
    within 2% of this, both with and without checkpointing; the sum would have been 16-23% over."""
    persistent = sum(memory[kind] for kind in
                     ("parameters", "master_weights", "optimizer_state", "ema", "reduce_bucket"))
    return persistent + max(memory["activations"], memory["gradients"]) + memory["recompute"]


def checkpoint_bytes(params: Parameters, layout: Layout) -> dict[str, int]:
    """Bytes one checkpoint writes over all ranks, and the host memory consolidating it takes.

    DeepSpeed's model files hold the weights in the training precision, each tensor-parallel rank its shard
    (replicated parameters once per TP rank, experts once). ZeRO 1/2 write each partition of the fp32
    masters and Adam moments once; without ZeRO (fp32: the weights are the masters) DeepSpeed writes the
    moments in the model file and again in each expert-parallel rank's file, so dense moments 1 + ep times
    and expert moments 1 + 1/ep times. The EMA shards (train/ema.py) are written once; before the EMA was
    sharded every rank wrote its whole copy (`ema_whole_per_rank`). Consolidation (train/consolidation.py)
    holds fp32 weights, both moments and the EMA of every parameter once: 16 bytes per parameter."""
    stored = sum(numel if kind in ("tensor_parallel", "experts") else numel * layout.tp for kind, numel in params.sizes)
    experts = params.count("experts")
    if layout.zero_stage:
        model, optimizer = stored * PRECISION_BYTES[layout.precision], 3 * stored * FP32
    else:
        model = stored * FP32
        optimizer = 2 * FP32 * ((stored - experts) * (1 + layout.ep) + experts * (1 + 1 / layout.ep))
    local = sum(sum(sizes) for sizes in params.per_rank(layout))
    total = sum(numel for _, numel in params.sizes)
    return {"model": model, "optimizer": round(optimizer), "ema": stored * FP32,
            "ema_whole_per_rank": local * FP32 * layout.world_size, "consolidation_memory": 4 * total * FP32}


def estimate(config: Config, layout: Layout) -> dict:
    """Parameters, model state, activations, peak memory and communication of one rank (bytes)."""
    params = count_parameters(config)
    dense, experts = (sum(sizes) for sizes in params.per_rank(layout))
    memory = {**model_state_bytes(params, layout), **activation_bytes(config, layout)}
    return {
        "layout": {**asdict(layout), "expert_dp": layout.expert_dp},
        "tokens_per_micro_batch": micro_batch_tokens(config, layout),
        "parameters": {**{kind: params.count(kind) for kind in PARAMETER_KINDS},
                       "per_rank_dense": dense, "per_rank_experts": experts},
        "memory": {**memory, "peak": peak_bytes(memory)},
        "communication": communication_bytes(config, layout, params),
        "checkpoint": checkpoint_bytes(params, layout),
    }

