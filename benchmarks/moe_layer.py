#!/usr/bin/env python
"""Forward+backward time of our DiffMoE layer against baselines on the same input, as ratios.

  python benchmarks/moe_layer.py                      # S width, E 4/8/16, 2K and 8K tokens
  python benchmarks/moe_layer.py --sizes S,B --tokens 2048,8192,16384

Baselines (the `name` of each result line):
  dense      the dense FFN of equal activated FLOPs (DiffMoE at capacity 1 sends each token through
             one expert on average)
  deepspeed  deepspeed.moe.layer.MoE with the same experts: top-1 gate, capacity factor 1 (drops
             tokens, so it does less work than dense)
  loop       a naive reference of our routing: per expert, gather its top-C tokens, run the expert,
             scatter back
Our layer runs as in training: router, capacity predictor, top-C over the pool, batched experts.
Each line is one JSON object (ours_ms, baseline_ms, ratio = ours_ms / baseline_ms, medians of the
repeats, implementations interleaved); a table follows.
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffmoe_scale.cli import docstring_parser  # noqa: E402
from diffmoe_scale.config import MODEL_SIZES  # noqa: E402
from diffmoe_scale.models import DiffMoELayer, FeedForward  # noqa: E402


class ExpertFFN(nn.Module):
    """One expert as DeepSpeed's MoE wants it (a module returning a tensor), holding our expert e's weights."""

    def __init__(self, layer: DiffMoELayer, e: int):
        super().__init__()
        experts = layer.experts
        self.fc1, self.fc2 = nn.Linear(*experts.w1.shape[1:]), nn.Linear(*experts.w2.shape[1:])
        with torch.no_grad():
            self.fc1.weight.copy_(experts.w1[e].T)
            self.fc1.bias.copy_(experts.b1[e])
            self.fc2.weight.copy_(experts.w2[e].T)
            self.fc2.bias.copy_(experts.b2[e])

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def deepspeed_moe(layer: DiffMoELayer, num_experts: int):
    from deepspeed.moe.layer import MoE

    moe = MoE(hidden_size=layer.router.in_features, expert=ExpertFFN(layer, 0), num_experts=num_experts, ep_size=1,
              k=1, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=True)
    moe.set_deepspeed_parallelism()
    for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):  # it copied expert 0 E times
        expert.load_state_dict(ExpertFFN(layer, e).state_dict())
    return moe


def loop_reference(layer: DiffMoELayer, x: torch.Tensor) -> torch.Tensor:
    """Our routing without any batching: expert by expert over the pool."""
    tokens = x.reshape(-1, x.shape[-1])
    scores = layer.router(tokens).softmax(dim=-1)
    capacity = layer.tokens_per_expert(len(tokens))
    out = torch.zeros_like(tokens)
    for e in range(layer.num_experts):
        chosen = scores[:, e].topk(capacity).indices
        out = out.index_add(0, chosen, scores[chosen, e:e + 1] * layer.experts.expert(e, tokens[chosen]))
    return out


def step_time_ms(run, x: torch.Tensor) -> float:
    x.grad = None
    start = time.perf_counter()
    run(x).backward()
    return (time.perf_counter() - start) * 1e3


def implementations(layer: DiffMoELayer, dense: FeedForward, moe) -> dict:
    """name -> function of the input returning a scalar to differentiate."""
    def ours(x):
        out, losses = layer(x)
        return out.sum() + sum(losses.values())

    def deepspeed(x):
        out, aux_loss, _ = moe(x)
        return out.sum() + aux_loss

    return {"ours": ours, "dense": lambda x: dense(x)[0].sum(), "deepspeed": deepspeed,
            "loop": lambda x: loop_reference(layer, x).sum()}


def measure(size: str, num_experts: int, tokens: int, repeats: int) -> list[dict]:
    _, dim, _ = MODEL_SIZES[size]
    torch.manual_seed(0)
    layer = DiffMoELayer(dim, 4 * dim, num_experts, capacity=1.0, pool="local").train()
    dense = FeedForward(dim, 4 * dim)
    runs = implementations(layer, dense, deepspeed_moe(layer, num_experts))
    x = torch.randn(1, tokens, dim).requires_grad_(True)
    times = {name: [] for name in runs}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, run in runs.items():
            elapsed = step_time_ms(run, x)
            if repeat:
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    return [{"name": name, "size": size, "experts": num_experts, "tokens": tokens, "ours_ms": round(median["ours"], 2),
             "baseline_ms": round(median[name], 2), "ratio": round(median["ours"] / median[name], 3)}
            for name in ("dense", "deepspeed", "loop")]


def main(argv=None) -> int:
    parser = docstring_parser(__doc__)
    parser.add_argument("--sizes", default="S", help="comma-separated DiT sizes for the width (S, B, L, XL)")
    parser.add_argument("--experts", default="4,8,16")
    parser.add_argument("--tokens", default="2048,8192", help="pool sizes (tokens per forward)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from diffmoe_scale.parallel.runtime import init_runtime

    init_runtime()  # DeepSpeed's MoE layer needs its process groups, here a world of one
    results = []
    for size in args.sizes.split(","):
        for num_experts in map(int, args.experts.split(",")):
            for tokens in map(int, args.tokens.split(",")):
                for result in measure(size, num_experts, tokens, args.repeats):
                    print(json.dumps(result), flush=True)
                    results.append(result)
    print(f"\n{'size':>4} {'E':>3} {'tokens':>6} {'ours ms':>8} | " + " | ".join(
        f"{name:>9} ms  ratio" for name in ("dense", "deepspeed", "loop")))
    for i in range(0, len(results), 3):
        first = results[i]
        print(f"{first['size']:>4} {first['experts']:>3} {first['tokens']:>6} {first['ours_ms']:>8.1f} | " + " | ".join(
            f"{r['baseline_ms']:>12.1f} {r['ratio']:>6.2f}" for r in results[i:i + 3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
