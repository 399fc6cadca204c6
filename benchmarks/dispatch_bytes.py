#!/usr/bin/env python
"""All-to-all bytes of one MoE layer's training step over EP=2: ours, the analytical minimum, DeepSpeed's MoE.

  python benchmarks/dispatch_bytes.py                     # widths 128 (digits) and 384 (S), E 4 and 8, 2K and 8K pools
  python benchmarks/dispatch_bytes.py --widths 384 --experts 8,16 --tokens 4096

Two processes (torchrun, gloo) each hold half of a pool of random tokens and half of the experts,
and run one forward+backward of each layer while torch.distributed's collectives are wrapped to
count the bytes each rank hands them for OTHER ranks (its own split left out). Per rank:
  ours       the all-to-alls of our DiffMoE layer with ExpertParallelDispatch (one pool over both
             ranks, top-C per expert)
  minimum    from the routing mask our layer chose: every (token, expert) pair whose expert lives on
             another rank moves D values there and back in forward, and their gradients in backward
  counted    the rows our dispatch counts itself (the trainer's `all_to_all_mb`), times D values
  deepspeed  the all-to-alls of deepspeed.moe.layer.MoE on the same tokens (top-1 gate, capacity
             factor 1, ep_size 2), whose buffers are padded to every expert's capacity
  routing    our all-gather of router scores and predictor probabilities (N_local x 2E floats), apart
  other      any other collective (all_reduce, and all_gather for DeepSpeed): expected 0 for both
Router and predictor are freshly initialised (the router as in DiT, N(0, 0.006^2)), so the routing is
close to random. Each line is one JSON object: a setting on one rank, bytes per step of one MoE layer
(fp32); a table follows.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from diffmoe_scale.cli import docstring_parser

import spawn
from moe_layer import deepspeed_top1

REPO = Path(__file__).resolve().parents[1]

RANKS = 2


def all_to_all_bytes(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    splits = input_split_sizes or [len(input) // size] * size
    row_bytes = input[0].numel() * input.element_size() if len(input) else 0
    return (sum(splits) - splits[rank]) * row_bytes


def all_gather_bytes(tensor_list, tensor, group=None, async_op=False):
    return (dist.get_world_size(group) - 1) * tensor.numel() * tensor.element_size()


def all_reduce_bytes(tensor, op=None, group=None, async_op=False):
    """What a ring all-reduce sends per rank: 2 (P - 1) / P of the tensor."""
    size = dist.get_world_size(group)
    return 2 * (size - 1) * tensor.numel() * tensor.element_size() // size


class CollectiveBytes:
    """While active, `sent[name]` sums the bytes this rank passes to torch.distributed's `name` for other ranks."""

    COUNTERS = {"all_to_all_single": all_to_all_bytes, "all_gather": all_gather_bytes, "all_reduce": all_reduce_bytes}

    def __enter__(self):
        self.sent, self.originals = Counter(), {name: getattr(dist, name) for name in self.COUNTERS}
        for name, original in self.originals.items():
            setattr(dist, name, self._counting(name, original))
        return self

    def _counting(self, name, original):
        def counted(*args, **kwargs):
            self.sent[name] += self.COUNTERS[name](*args, **kwargs)
            return original(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(dist, name, original)


def step_bytes(run, x) -> Counter:
    """Collective bytes sent to other ranks during one forward+backward; `run` returns the scalar to differentiate."""
    with CollectiveBytes() as counter:
        run(x).backward()
    return counter.sent


def minimum_bytes(layer, local_tokens: int, rank: int, row_bytes: int) -> int:
    """Bytes this rank must send in a step for the routing `layer` chose: per pair that crosses ranks,
    D values out and back in forward and their gradients in backward."""
    pair_expert, pair_token = layer.last_pairs
    owner = pair_token // local_tokens
    holder = pair_expert // (layer.num_experts // RANKS)
    crossing = int(((owner == rank) & (holder != rank)).sum() + ((holder == rank) & (owner != rank)).sum())
    return 2 * crossing * row_bytes


def measure(width: int, num_experts: int, pool_tokens: int, groups) -> dict:
    from diffmoe_scale.models import DiffMoELayer
    from diffmoe_scale.parallel.expert_parallel import apply_expert_parallel, rows_sent_to_other_ranks

    local, rank = pool_tokens // RANKS, groups.ep_rank
    torch.manual_seed(0)  # the same pool and the same layer on every rank
    pool = torch.randn(pool_tokens, width)
    x = pool[rank * local:(rank + 1) * local].view(1, local, width).requires_grad_(True)
    layer = DiffMoELayer(width, 4 * width, num_experts)
    layer.reset_router()
    apply_expert_parallel(nn.ModuleList([layer]), groups)  # this rank's experts, the EP dispatch
    expert = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
    moe = deepspeed_top1(width, expert, num_experts, ep_size=RANKS)

    def ours(tokens):
        out, losses = layer(tokens)
        return out.sum() + sum(losses.values())

    def deepspeed(tokens):
        out, aux_loss, _ = moe(tokens)
        return out.sum() + aux_loss

    ours_sent = step_bytes(ours, x)
    deepspeed_sent = step_bytes(deepspeed, x)
    row_bytes = width * x.element_size()
    minimum = minimum_bytes(layer, local, rank, row_bytes)
    counted = rows_sent_to_other_ranks(SimpleNamespace(moe_layers=lambda: [layer])) * row_bytes
    return {"width": width, "experts": num_experts, "pool_tokens": pool_tokens, "rank": rank,
            "ours_bytes": ours_sent["all_to_all_single"], "minimum_bytes": minimum, "counted_bytes": counted,
            "deepspeed_bytes": deepspeed_sent["all_to_all_single"],
            "routing_all_gather_bytes": ours_sent["all_gather"],
            "other_bytes": {"ours": ours_sent["all_reduce"], "deepspeed": deepspeed_sent["all_gather"]
                            + deepspeed_sent["all_reduce"]},
            "ours/minimum": round(ours_sent["all_to_all_single"] / minimum, 4),
            "deepspeed/minimum": round(deepspeed_sent["all_to_all_single"] / minimum, 4)}


def settings(args) -> list[tuple[int, int, int]]:
    return [(width, experts, tokens) for width in map(int, args.widths.split(","))
            for experts in map(int, args.experts.split(",")) for tokens in map(int, args.tokens.split(","))]


def worker(args) -> None:
    """A rank under torchrun: measure every setting, rank 0 writes all ranks' results to args.out."""
    from diffmoe_scale.config import load_config
    from diffmoe_scale.parallel.collectives import all_gather_objects
    from diffmoe_scale.parallel.groups import setup_groups
    from diffmoe_scale.parallel.launcher import exit_process
    from diffmoe_scale.parallel.runtime import init_runtime, shutdown_runtime

    runtime = init_runtime()
    groups = setup_groups(load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", [f"parallel.ep={RANKS}"]))
    results = [measure(*setting, groups) for setting in settings(args)]
    per_rank = all_gather_objects(results)
    if runtime.is_main:
        Path(args.out).write_text(json.dumps([r for setting in zip(*per_rank) for r in setting]))
    shutdown_runtime()
    exit_process(0)


def launch(argv: list[str]) -> list[dict]:
    """Run this script's workers on RANKS processes; returns their results."""
    with tempfile.TemporaryDirectory(prefix="bench_dispatch_") as tmp:
        out = Path(tmp) / "results.json"
        command = spawn.command(RANKS, [__file__, *argv, "--out", str(out)])
        run = subprocess.run(command, cwd=REPO, env=spawn.environment(1), capture_output=True, text=True)
        if run.returncode:
            output = f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
            raise SystemExit(f"{' '.join(command)} exited {run.returncode}:\n{output}")
        return json.loads(out.read_text())


def print_table(results: list[dict]) -> None:
    columns = ("ours", "minimum", "counted", "deepspeed")
    print(f"\n{'width':>5} {'E':>3} {'pool':>6} {'rank':>4} | " + " ".join(f"{c:>9}" for c in columns)
          + f" | {'ours/min':>8} {'ds/min':>7} | {'routing':>8}   (MiB per step and layer)")
    for r in results:
        print(f"{r['width']:>5} {r['experts']:>3} {r['pool_tokens']:>6} {r['rank']:>4} | "
              + " ".join(f"{r[c + '_bytes'] / 2**20:>9.3f}" for c in columns)
              + f" | {r['ours/minimum']:>8.3f} {r['deepspeed/minimum']:>7.3f} "
              f"| {r['routing_all_gather_bytes'] / 2**20:>8.4f}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = docstring_parser(__doc__)
    parser.add_argument("--widths", default="128,384", help="model widths D (128: the digits config, 384: DiT-S)")
    parser.add_argument("--experts", default="4,8")
    parser.add_argument("--tokens", default="2048,8192", help="pool sizes: tokens of both ranks together")
    parser.add_argument("--out", help=argparse.SUPPRESS)  # set for the ranks: where rank 0 writes the results
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out:  # a rank started by `launch`
        worker(args)
    results = launch(argv)
    for result in results:
        print(json.dumps(result))
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
