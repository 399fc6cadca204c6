#!/usr/bin/env python
"""Memory and communication per rank of a training config on a parallel layout, before running it.

  python launch/estimate.py --config configs/imagenet/diffmoe_l_e8_flow.yaml --world-size 8 --set train.precision=bf16
  python launch/estimate.py --config C.yaml --world-size 32 --set parallel.zero_stage=2 --gpu-memory-gb 80 --json
  torchrun --nproc_per_node 2 launch/estimate.py --measure \\
      --config configs/digits_diffmoe_e4_flow.yaml --set parallel.ep=2

The layout is the trainer's: --world-size ranks (default parallel.ep x parallel.tp, one EP group) as
tp x dp, dp in EP groups of parallel.ep, with the config's ZeRO stage, precision, activation
checkpointing and micro-batch (train.global_batch_size / (dp x train.grad_accum_steps) images per
rank). Memory is given without and with activation checkpointing (the config's choice first): the
model state as DeepSpeed allocates it, what one micro-batch's forward keeps for backward, and the
peak of a step (the persistent state and the reduce bucket, the larger of activations and gradients,
one recomputed block). Not counted: the CUDA context, NCCL's buffers and allocator fragmentation
(a few GiB on a GPU), and the short-lived tensors of a single op. Communication is what each rank
sends per optimizer step, for ring collectives.

--measure runs two steps of the real trainer under the launcher that started it (on its ranks; the
config's dataset must be readable) and prints what each rank held, kept and sent beside the estimate.
"""
import argparse
import dataclasses
import json
import sys

from diffmoe_scale.cli import docstring_parser
from diffmoe_scale.config import ConfigError, load_config
from diffmoe_scale.estimate import ATTENTION_BACKENDS, PARAMETER_KINDS, estimate, layout_of
from diffmoe_scale.eval.sampling_estimate import sampling_estimate

GIB = 2**30
MEMORY_ROWS = {"parameters": "parameters", "gradients": "gradients", "reduce_bucket": "ZeRO reduce bucket",
               "master_weights": "fp32 master weights", "optimizer_state": "Adam moments (fp32)",
               "ema": "EMA weights (fp32)", "activations": "activations (one micro-batch)",
               "recompute": "one block recomputed", "peak": "peak of a step"}
COMMUNICATION_ROWS = {"moe_all_to_all": "MoE all-to-all", "routing_all_gather": "routing all-gather",
                      "gradient_reduction": "gradient reduction", "tensor_parallel": "tensor-parallel all-reduce"}


def size(count: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f} B"


def checkpointing_name(every: int) -> str:
    if every == 0:
        return "no checkpointing"
    return "checkpointing every block" if every == 1 else f"checkpointing every {every}"


def print_estimates(config_path: str, estimates: list[dict], gpu_memory: float) -> None:
    first, column = estimates[0], 30
    layout, params = first["layout"], first["parameters"]
    print(f"{config_path} on {layout['world_size']} ranks: dp {layout['dp']} x tp {layout['tp']}, ep {layout['ep']} "
          f"(expert-dp {layout['expert_dp']}), ZeRO {layout['zero_stage']}, {layout['precision']}; micro-batch "
          f"{layout['micro_batch']} images ({first['tokens_per_micro_batch']:,} tokens) per rank, "
          f"{layout['grad_accum']} micro-batch(es) per step; {layout['attention']} attention")
    millions = {kind: params[kind] / 1e6 for kind in params}
    print(f"parameters: {sum(millions[kind] for kind in PARAMETER_KINDS):,.1f} M (replicated "
          f"{millions['replicated']:,.1f} M, tensor-parallel {millions['tensor_parallel']:,.1f} M, routers and "
          f"predictors {millions['routing']:,.1f} M, experts {millions['experts']:,.1f} M); per rank "
          f"{millions['per_rank_dense']:,.1f} M dense + {millions['per_rank_experts']:,.1f} M expert\n")
    names = [checkpointing_name(e["layout"]["checkpoint_every"]) for e in estimates]
    names[0] += " (config)"
    print(f"{'memory per rank':<32}" + "".join(f"{name:>{column}}" for name in names))
    for key, label in MEMORY_ROWS.items():
        print(f"  {label:<30}" + "".join(f"{size(e['memory'][key]):>{column}}" for e in estimates))
    headroom = [size(e["headroom"]) if e["headroom"] >= 0 else f"over by {size(-e['headroom'])}" for e in estimates]
    print(f"  {f'headroom on {gpu_memory / GIB:g} GiB':<30}" + "".join(f"{cell:>{column}}" for cell in headroom))
    print("\nsent per rank and step")
    for key, label in COMMUNICATION_ROWS.items():
        print(f"  {label:<30}" + "".join(f"{size(e['communication'][key]):>{column}}" for e in estimates))
    checkpoint = first["checkpoint"]
    written = checkpoint["model"] + checkpoint["optimizer"] + checkpoint["ema"]
    print(f"\ncheckpoint (all ranks): {size(written)} per save (model {size(checkpoint['model'])}, optimizer "
          f"{size(checkpoint['optimizer'])}, EMA {size(checkpoint['ema'])}; a whole EMA per rank would be "
          f"{size(checkpoint['ema_whole_per_rank'])}); consolidating it holds {size(checkpoint['consolidation_memory'])} "
          f"of host memory")


def print_sampling(sampling: dict, ep: int) -> None:
    print(f"\nFID-50K sampling (launch/sample.py, 256 samples per token pool, EP {ep}): a rank holds "
          f"{sampling['rows_per_rank']} rows of a pool ({size(sampling['latent_bytes_per_rank'])} of fp32 latents, "
          f"{size(sampling['shard_bytes'])} of {sampling['image_side']} px pixels) and writes that shard per pool; "
          f"{sampling['pools']} pools in {sampling['rounds']} rounds, {sampling['shards']} shards; samples.npz "
          f"{size(sampling['npz_bytes'])}, merged on rank 0 at a peak of ~{size(sampling['merge_peak_bytes'])}")


def print_measurements(estimated: dict, measured: list[dict]) -> None:
    expected = {**estimated["memory"], **estimated["communication"], "peak_allocated": estimated["memory"]["peak"]}
    print(f"{'':<22}{'estimate':>14}" + "".join(f"{f'rank {rank} (error)':>26}" for rank in range(len(measured))))
    for key in measured[0]:
        cells = [f"{size(m[key])} ({expected[key] / m[key] - 1:+.1%})" if m[key] else size(0) for m in measured]
        print(f"{key:<22}{size(expected[key]):>14}" + "".join(f"{cell:>26}" for cell in cells))


def run_measurement(config, args) -> None:
    """Collective: every rank measures; rank 0 prints. Ends the process."""
    from diffmoe_scale.estimate_check import measure
    from diffmoe_scale.parallel.collectives import all_gather_objects
    from diffmoe_scale.parallel.launcher import exit_process
    from diffmoe_scale.parallel.runtime import init_runtime, shutdown_runtime

    runtime = init_runtime()
    if args.world_size not in (None, runtime.world_size):
        raise ConfigError(f"--world-size {args.world_size}: --measure runs on the launcher's "
                          f"{runtime.world_size} ranks")
    measured = all_gather_objects(measure(config, runtime))
    if runtime.is_main:
        estimated = estimate(config, layout_of(config, runtime.world_size, args.attention))
        if args.json:
            print(json.dumps({"estimate": estimated, "measured": measured}))
        else:
            print_measurements(estimated, measured)
    shutdown_runtime()
    exit_process(0)


def main(argv=None) -> int:
    parser = docstring_parser(__doc__)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, as in pretrain_diffmoe.py; repeatable")
    parser.add_argument("--world-size", type=int, help="number of ranks (default: parallel.ep x parallel.tp)")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default="flash",
                        help="what attention keeps for backward: flash (the flash and memory-efficient kernels of "
                        "GPUs, the CPU's flash kernel: q, k, v, output, log-sum-exp; default) or math (the softmax "
                        "matrix)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--measure", action="store_true", help="run two training steps and print what they used")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.measure:
            run_measurement(config, args)
        layout = layout_of(config, args.world_size, args.attention)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    every = config.parallel.activation_checkpointing_every
    other = dataclasses.replace(layout, checkpoint_every=0 if layout.checkpoint_every else every)
    gpu_memory = args.gpu_memory_gb * GIB
    estimates = []
    for case in (layout, other):
        result = estimate(config, case)
        estimates.append({**result, "headroom": gpu_memory - result["memory"]["peak"]})
    sampling = sampling_estimate(config, layout.world_size)
    if args.json:
        print(json.dumps({"config": args.config, "gpu_memory": gpu_memory, "estimates": estimates,
                          "sampling": sampling}))
    else:
        print_estimates(args.config, estimates, gpu_memory)
        print_sampling(sampling, config.parallel.ep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
