#!/usr/bin/env python
"""Inspect, consolidate (reshard) and export checkpoints.

  python launch/checkpoint.py inspect runs/x/checkpoints                 # every checkpoint, verified
  python launch/checkpoint.py consolidate runs/x/checkpoints/step_00010000
  python launch/checkpoint.py export-ema runs/x/checkpoints/step_00010000 --out ema.safetensors

`consolidate` turns a sharded checkpoint into whole tensors that any parallel layout resumes from
(another world size, EP or TP size, ZeRO stage), writing <checkpoint>_consolidated/ beside it, where
`pretrain_diffmoe.py --resume auto` finds it. It runs as one CPU process that reads the checkpoint's
files (memory-mapped) without starting ranks, and writes the whole tensors one part at a time (weights, each
Adam moment, the EMA: 4 bytes per parameter each); a GPU-written checkpoint consolidates on any machine.
"""
import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from diffmoe_scale.cli import docstring_parser
from diffmoe_scale.config import ConfigError
from diffmoe_scale.train.checkpoint import (CONSOLIDATED, SHARDED, code_version, consolidated_twin,
                                            describe_layout, is_checkpoint, list_checkpoints, publish,
                                            read_ema_weights, read_manifest, verify)
from diffmoe_scale.train.consolidation import write_consolidated


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def inspect(args) -> int:
    """One line per checkpoint, each verified against its manifest; exit 1 if any is unusable."""
    path = Path(args.path)
    try:
        checkpoints = [path] if is_checkpoint(path) else list_checkpoints(path)
    except ConfigError as err:
        return fail(str(err))
    if not checkpoints:
        return fail(f"{path}: no checkpoints there")
    unusable = 0
    for checkpoint in checkpoints:
        manifest, problem = verify(checkpoint)
        if problem:
            unusable += 1
            print(f"{checkpoint}: UNUSABLE: {problem}")
            continue
        model, moe = manifest["config"]["model"], manifest["config"]["moe"]
        mib = sum(size for size, _ in manifest["files"].values()) / 2**20
        experts = f", {moe['num_experts']} experts" if moe["ffn"] != "dense" else ""
        print(f"{checkpoint}: {manifest['kind']}, step {manifest['step']}, written by {describe_layout(manifest['layout'])}"
              f"; {len(manifest['files'])} files, {mib:.1f} MiB, intact")
        print(f"    model {moe['ffn']} depth {model['depth']} width {model['hidden_size']}{experts}; run "
              f"{manifest['run_id']}, code {manifest['code_version']}, saved {manifest['saved_at']}")
    return 1 if unusable else 0


def consolidate(args) -> int:
    path = Path(args.path)
    manifest, problem = verify(path)
    if problem:
        return fail(f"{path}: {problem}")
    if manifest["kind"] == CONSOLIDATED:
        print(f"{path} is consolidated already")
        return 0
    out = Path(args.out) if args.out else consolidated_twin(path)
    print(f"consolidating {path} ({describe_layout(manifest['layout'])}) -> {out}", flush=True)
    began = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_consolidated(path, manifest, out)
    meta = {key: manifest[key] for key in ("step", "run_id", "branched_from", "layout", "config") if key in manifest}
    publish(out, {**meta, "kind": CONSOLIDATED, "code_version": code_version(),
                  "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "consolidated_from": str(path)})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    print(f"consolidated step {manifest['step']} into {out} ({time.perf_counter() - began:.1f} s, peak memory "
          f"{peak:.2f} GiB)", flush=True)
    return 0


def export_ema(args) -> int:
    """The EMA weights (and thresholds) as one safetensors file, named as in `build_model`'s model,
    with the config, step and run id in its metadata."""
    path = Path(args.path)
    manifest, problem = verify(path)
    if problem:
        return fail(f"{path}: {problem}")
    if manifest["kind"] == SHARDED:
        consolidated = consolidated_twin(path)
        if read_manifest(consolidated)[1] and consolidate(argparse.Namespace(path=str(path), out=None)):
            return fail(f"{path}: could not consolidate it")
        path, (manifest, _) = consolidated, read_manifest(consolidated)
    config, ema, step = read_ema_weights(path)
    metadata = {"config": json.dumps(config), "step": str(step), "run_id": manifest["run_id"],
                "code_version": manifest["code_version"], "source": str(path)}
    save_file({name: tensor.contiguous() for name, tensor in ema.items()}, args.out, metadata=metadata)
    print(f"exported the EMA weights of step {step} ({len(ema)} tensors) to {args.out}")
    return 0


def main(argv=None) -> int:
    parser = docstring_parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("inspect", help="summarise and verify a checkpoint or every one in a directory")
    command.add_argument("path")
    command.set_defaults(run=inspect)
    command = commands.add_parser("consolidate", help="whole tensors from a sharded checkpoint, for any layout")
    command.add_argument("path", help="a sharded checkpoint directory (step_<n>)")
    command.add_argument("--out", help="output directory (default: <path>_consolidated beside it)")
    command.set_defaults(run=consolidate)
    command = commands.add_parser("export-ema", help="EMA weights to one safetensors file (consolidates first)")
    command.add_argument("path", help="a sharded or consolidated checkpoint directory")
    command.add_argument("--out", required=True, help="the .safetensors file to write")
    command.set_defaults(run=export_ema)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
