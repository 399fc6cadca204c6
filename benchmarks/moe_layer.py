#!/usr/bin/env python
"""Forward+backward time and peak memory of our DiffMoE layer against baselines on the same input, as ratios.

  python benchmarks/moe_layer.py                 # S width at 2K, 8K, 16K tokens, B at 2K, 8K; E 4/8/16 (~6 min)
  python benchmarks/moe_layer.py --sizes B --tokens 16384 --experts 8
  python benchmarks/moe_layer.py --device cuda --dtype bf16
  python benchmarks/moe_layer.py --combine       # the combine alone: segment sum against index_add
  python benchmarks/moe_layer.py --sizes S --tokens 8192 --baselines dense_predictor,compiled

Baselines (the `name` of each result line):
  dense      the dense FFN of equal activated FLOPs (DiffMoE at capacity 1 sends each token through
             one expert on average), as DiT has it: Linear -> GELU(tanh) -> Linear
  dense_predictor  the dense FFN plus our layer's capacity predictor and its loss: the predictor's
             FLOPs (a D x D and a D x E layer, forward and weight gradients) are 8% of the FFN's, so
             ours / dense_predictor is what routing and dispatch cost
  deepspeed  deepspeed.moe.layer.MoE with the same experts: top-1 gate, capacity factor 1 (drops
             tokens, so it does less work than dense)
  loop       a naive reference of our routing: per expert, gather its top-C tokens, run the expert,
             scatter back
  compiled   our layer under torch.compile (inductor, one graph; what train.compile runs inside each
             block): ours / compiled is what compiling gains. Not in the default list (it compiles each case)
Our layer runs as in training: router, capacity predictor and its loss, top-C over the pool, batched
experts. Every implementation gets the same input and upstream gradient; they run interleaved (ours, dense, deepspeed,
loop, ours, ...) after a warm-up round, and each result is the median over the repeats of the
per-repeat ratio ours / baseline, with its min-max spread (DESIGN.md, section 6). Peak memory is
the most memory one forward+backward allocates above what was allocated before it: activations,
temporaries and gradients (E experts have E times the dense FFN's weight gradients); on CUDA from
the allocator's statistics, on a CPU from the profiler's record of every allocation and free.
On a CPU, freed memory is kept for reuse as in training (`keep_freed_cpu_memory`), so that page faults
of fresh allocations do not decide the comparison. Each line printed is one JSON object; a table follows.

With --combine, only the gate-weighted combine is timed (forward and backward, fp32 rows as the layer
accumulates them, each expert taking tokens/E random tokens): ours by segments per token (what a GPU
runs: no atomics, the same bits every run; backward a gather), ours with index_add (what a CPU runs:
there the same additions in the same order; backward a gather) and torch's index_add with its own
autograd (the previous combine: atomics on a GPU).
"""
import contextlib
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from diffmoe_scale.cli import docstring_parser
from diffmoe_scale.config import MODEL_SIZES
from diffmoe_scale.models import DiffMoELayer, FeedForward
from diffmoe_scale.models.pair_rows import sum_by_token, token_order
from diffmoe_scale.parallel.runtime import init_runtime, keep_freed_cpu_memory

BASELINES = ("dense", "dense_predictor", "deepspeed", "loop", "compiled")
DEFAULT_BASELINES = BASELINES[:4]
DEFAULT_CASES = {"S": (2048, 8192, 16384), "B": (2048, 8192)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def deepspeed_top1(hidden_size: int, expert: nn.Module, num_experts: int, ep_size: int = 1):
    """deepspeed.moe.layer.MoE as the benchmarks compare with it: top-1 gate, capacity factor 1, dropping
    the tokens over capacity; `expert` is copied for every expert."""
    from deepspeed.moe.layer import MoE

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints about its groups; stdout holds the results
        moe = MoE(hidden_size=hidden_size, expert=expert, num_experts=num_experts, ep_size=ep_size, k=1,
                  capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=True)
        moe.set_deepspeed_parallelism()
    return moe


def deepspeed_moe(layer: DiffMoELayer, num_experts: int):
    """DeepSpeed's top-1 MoE holding our layer's experts."""
    moe = deepspeed_top1(layer.router.in_features, ExpertFFN(layer, 0), num_experts)
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


def implementations(layer: DiffMoELayer, dense: FeedForward, baselines: list[str]) -> tuple[dict, list]:
    """(name -> function of the input returning (output, its own loss or None), every parameter they use)."""
    def ours(x):
        out, losses = layer(x)
        return out, losses["predictor"]

    def dense_predictor(x):
        tokens = x.reshape(-1, x.shape[-1]).detach()
        logits = layer.predictor(tokens)
        return dense(x)[0], F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))

    runs = {"ours": ours, "dense": lambda x: (dense(x)[0], None), "dense_predictor": dense_predictor,
            "loop": lambda x: (loop_reference(layer, x), None)}
    if "compiled" in baselines:
        torch._dynamo.reset()  # each case compiles its own graph (the cases' shapes differ)
        runs["compiled"] = torch.compile(ours, fullgraph=True)
    modules = [layer, dense]
    if "deepspeed" in baselines:
        moe = deepspeed_moe(layer, layer.num_experts).to(layer.router.weight.device, layer.router.weight.dtype)
        modules.append(moe)

        def deepspeed(x):
            out, balance_loss, _ = moe(x)
            return out, balance_loss

        runs["deepspeed"] = deepspeed
    params = [p for module in modules for p in module.parameters()]
    return {name: runs[name] for name in ("ours", *baselines)}, params


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(run, x: torch.Tensor, upstream: torch.Tensor) -> None:
    """The output's backward under a fixed upstream gradient, as inside a network (a `.sum()` would hand
    every implementation an expanded gradient that some ops must first copy), plus the
    implementation's own loss."""
    out, loss = run(x)
    outputs, grads = [out.view_as(upstream)], [upstream]
    if loss is not None:
        outputs.append(loss)
        grads.append(torch.ones_like(loss))
    torch.autograd.backward(outputs, grads)


def clear_grads(tensors: list[torch.Tensor]) -> None:
    """Every step starts without gradients, as training's zero_grad(set_to_none=True) leaves it (accumulating
    into kept gradients would charge each implementation an extra pass over its weight gradients)."""
    for tensor in tensors:
        tensor.grad = None


def step_ms(run, x: torch.Tensor, upstream: torch.Tensor, params: list[torch.Tensor]) -> float:
    clear_grads([x, *params])
    synchronize(x.device)
    start = time.perf_counter()
    forward_backward(run, x, upstream)
    synchronize(x.device)
    return (time.perf_counter() - start) * 1e3


def peak_memory_mb(run, x: torch.Tensor, upstream: torch.Tensor, params: list[torch.Tensor]) -> float:
    """Memory one forward+backward allocates at its peak above what was allocated before (see the docstring)."""
    clear_grads([x, *params])
    if x.device.type == "cuda":
        synchronize(x.device)
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        forward_backward(run, x, upstream)
        synchronize(x.device)
        return (torch.cuda.max_memory_allocated(x.device) - before) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        forward_backward(run, x, upstream)
    # The allocator's events, in time order: bytes allocated (> 0) and freed (< 0).
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def measure(size: str, num_experts: int, tokens: int, args) -> list[dict]:
    _, dim, _ = MODEL_SIZES[size]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    layer = DiffMoELayer(dim, 4 * dim, num_experts, capacity=1.0, pool="local").train().to(device, dtype)
    dense = FeedForward(dim, 4 * dim).to(device, dtype)
    runs, params = implementations(layer, dense, args.baselines)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype).requires_grad_(True)
    upstream = torch.randn_like(x)
    times = {name: [] for name in runs}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, run in runs.items():
            elapsed = step_ms(run, x, upstream, params)
            if repeat:
                times[name].append(elapsed)
    memory = {name: peak_memory_mb(run, x, upstream, params) for name, run in runs.items()}
    results = []
    for name in args.baselines:
        ratios = [ours / base for ours, base in zip(times["ours"], times[name])]
        results.append({
            "name": name, "size": size, "experts": num_experts, "tokens": tokens, "device": args.device,
            "dtype": args.dtype, "ours_ms": round(statistics.median(times["ours"]), 2),
            "baseline_ms": round(statistics.median(times[name]), 2), "ratio": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
            "ours_peak_mb": round(memory["ours"], 1), "baseline_peak_mb": round(memory[name], 1),
        })
    return results


COMBINES = ("segments", "index_add_ordered", "index_add_autograd")


def measure_combine(size: str, num_experts: int, tokens: int, args) -> dict:
    """Forward+backward ms of each combine on the same pairs (see the docstring), medians over the repeats."""
    _, dim, _ = MODEL_SIZES[size]
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    chosen = [torch.randperm(tokens, generator=generator, device=device)[: tokens // num_experts].sort().values
              for _ in range(num_experts)]
    order = token_order(torch.cat(chosen), tokens)
    rows = torch.randn(len(order.pair_token), dim, device=device, requires_grad=True)
    upstream = torch.randn(tokens, dim, device=device)
    runs = {"segments": lambda: sum_by_token(rows, order, segments=True),
            "index_add_ordered": lambda: sum_by_token(rows, order, segments=False),
            "index_add_autograd": lambda: torch.zeros_like(upstream).index_add(0, order.pair_token, rows)}
    times = {name: [] for name in runs}
    for repeat in range(args.repeats + 1):
        for name, run in runs.items():
            rows.grad = None
            synchronize(device)
            start = time.perf_counter()
            run().backward(upstream)
            synchronize(device)
            if repeat:
                times[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"name": "combine", "size": size, "experts": num_experts, "tokens": tokens, "device": args.device,
            **{f"{name}_ms": round(ms, 3) for name, ms in medians.items()},
            "segments/index_add_autograd": round(medians["segments"] / medians["index_add_autograd"], 3)}


def cases(args) -> list[tuple[str, int]]:
    if args.sizes is None and args.tokens is None:
        return [(size, tokens) for size, token_counts in DEFAULT_CASES.items() for tokens in token_counts]
    sizes = (args.sizes or ",".join(DEFAULT_CASES)).split(",")
    token_counts = [int(t) for t in (args.tokens or "2048,8192").split(",")]
    return [(size, tokens) for size in sizes for tokens in token_counts]


def print_table(results: list[dict], baselines: list[str]) -> None:
    print(f"\n{'size':>4} {'E':>3} {'tokens':>6} {'ours ms':>8} {'ours MB':>8} | " + " | ".join(
        f"{name:>9}: ms  ratio [spread]  MB" for name in baselines))
    for i in range(0, len(results), len(baselines)):
        first = results[i]
        print(f"{first['size']:>4} {first['experts']:>3} {first['tokens']:>6} {first['ours_ms']:>8.1f} "
              f"{first['ours_peak_mb']:>8.0f} | " + " | ".join(
                  f"{r['baseline_ms']:>11.1f} {r['ratio']:>5.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] "
                  f"{r['baseline_peak_mb']:>5.0f}" for r in results[i:i + len(baselines)]))


def print_combines(results: list[dict]) -> int:
    for result in results:
        print(json.dumps(result), flush=True)
    print(f"\n{'size':>4} {'E':>3} {'tokens':>6} " + " ".join(f"{name + ' ms':>22}" for name in COMBINES)
          + "  segments / index_add")
    for r in results:
        print(f"{r['size']:>4} {r['experts']:>3} {r['tokens']:>6} "
              + " ".join(f"{r[name + '_ms']:>22.2f}" for name in COMBINES) + f"  {r['segments/index_add_autograd']:>8.2f}")
    return 0


def main(argv=None) -> int:
    parser = docstring_parser(__doc__)
    parser.add_argument("--sizes", help="comma-separated DiT sizes for the width (S, B, L, XL); default: see above")
    parser.add_argument("--tokens", help="comma-separated pool sizes (tokens per forward); default: see above")
    parser.add_argument("--experts", default="4,8,16")
    parser.add_argument("--baselines", default=",".join(DEFAULT_BASELINES),
                        help="comma-separated subset of " + ", ".join(BASELINES))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--combine", action="store_true", help="time the combine alone (see the docstring)")
    args = parser.parse_args(argv)
    args.baselines = args.baselines.split(",")
    unknown = [name for name in args.baselines if name not in BASELINES]
    if unknown or args.repeats < 1:
        parser.error(f"unknown baseline {unknown}" if unknown else "--repeats must be at least 1")
    for size, _ in cases(args):
        if size not in MODEL_SIZES:
            parser.error(f"--sizes: unknown size {size!r} (one of {', '.join(MODEL_SIZES)})")
    torch.set_num_threads(args.threads)
    keep_freed_cpu_memory()
    if args.combine:
        return print_combines([measure_combine(size, int(e), tokens, args)
                               for size, tokens in cases(args) for e in args.experts.split(",")])
    if "deepspeed" in args.baselines:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout (a handler made at import)
            init_runtime()  # DeepSpeed's MoE layer needs its process groups, here a world of one
    results = []
    for size, tokens in cases(args):
        for num_experts in map(int, args.experts.split(",")):
            for result in measure(size, num_experts, tokens, args):
                print(json.dumps(result), flush=True)
                results.append(result)
    print_table(results, args.baselines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
