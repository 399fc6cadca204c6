#!/usr/bin/env python
"""Class-conditional samples from trained EMA weights, over any number of ranks, for evaluation (FID-50K).

  python launch/sample.py --weights ema.safetensors --out samples/ --num-samples 50000 --vae /models/sd-vae-ft-ema
  torchrun --nproc_per_node 8 launch/sample.py --weights runs/x/checkpoints/step_07000000_consolidated --ep 8 ...
  python launch/sample.py --weights ema.safetensors --out s/ --digits --search-offsets=-0.1:0.1:5

--weights is what `launch/checkpoint.py export-ema` writes, or a consolidated checkpoint. Sample i has
label i mod the number of classes and starting noise seeded by --seed and i; samples i // --batch-size
form one token pool, sampled by one expert-parallel group (--ep ranks) at a time. So with the
deterministic samplers (euler, heun, ddim) the samples are the same on any number of ranks, and so is
DDPM's ancestral sampler with --ep 1. Every rank decodes its own samples (--vae, default the config's
data.vae, for latent models) and writes them to its own shard in OUT/shards as it goes; SIGUSR1/SIGTERM
stop after the current batch with exit status 75 and the same command continues where it stopped
(eval/sample_shards.py). At the end rank 0 merges the shards into samples.npz (ADM's layout: arr_0
uint8 [N, H, W, C], arr_1 labels; the same bytes for the same samples), and writes grid.png and
sampling.json with the inference C_avg. --precision (default the config's sample.precision, auto)
samples in bf16 where the device has it (a GPU), else in fp32. DiffMoE routes by its learned
thresholds; --threshold-offset adds a constant to all of them, and --search-offsets A:B:N first samples
--search-samples images at N offsets from A to B, scores them (--digits, or --inception with
--reference) and uses the best.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from diffmoe_scale.cli import docstring_parser, report_error
from diffmoe_scale.config import Config, ConfigError, config_from_dict
from diffmoe_scale.parallel.launcher import report_exit_status, tie_to_launcher
from diffmoe_scale.train.checkpoint import read_ema_weights
from diffmoe_scale.train.ema_thresholds import load_ema_weights


def parse_args(argv=None):
    parser = docstring_parser(__doc__)
    parser.add_argument("--weights", required=True, type=Path, help="exported EMA .safetensors or consolidated checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="output directory (a rerun continues in it)")
    parser.add_argument("--num-samples", type=int, default=50000)
    parser.add_argument("--batch-size", type=int, default=256,
                        help="samples per token pool (one EP group's batch); part of what fixes the samples")
    parser.add_argument("--sampler", help="default: the config's (flow: euler, heun; ddpm: ancestral, ddim)")
    parser.add_argument("--steps", type=int, help="default: the config's sample.steps")
    parser.add_argument("--cfg-scale", type=float, help="default: the config's sample.cfg_scale")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="default: the config's sample.precision")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size for sampling (divides the ranks)")
    parser.add_argument("--vae", help="AutoencoderKL to decode latents (local dir or hub name); default data.vae")
    parser.add_argument("--thresholds", help="DiffMoE thresholds: copy, average or calibrate (default: the config's "
                        "sample.thresholds; see docs/evaluation.md)")
    parser.add_argument("--threshold-offset", type=float, default=0.0, help="added to every DiffMoE threshold")
    parser.add_argument("--search-offsets", metavar="A:B:N", help="try N offsets from A to B first, keep the best")
    parser.add_argument("--search-samples", type=int, default=1000, help="samples per offset in the search")
    parser.add_argument("--digits", action="store_true", help="score the search by digit FID")
    parser.add_argument("--inception", type=Path, help="score the search by FID with this Inception network")
    parser.add_argument("--reference", type=Path, help="reference statistics for --inception")
    parser.add_argument("--grid", type=int, default=8, help="samples per class in grid.png")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sampling_config(saved: dict, args) -> Config:
    """The training config with the sampling settings and layout of this run (weights load in fp32)."""
    raw = {section: dict(values) for section, values in saved.items()}
    raw["parallel"] = {"ep": args.ep}
    raw["train"]["precision"] = "fp32"
    for key, value in (("sampler", args.sampler), ("steps", args.steps), ("cfg_scale", args.cfg_scale),
                       ("precision", args.precision), ("thresholds", args.thresholds)):
        if value is not None:
            raw["sample"][key] = value
    if args.vae:
        raw["data"]["vae"] = args.vae
    return config_from_dict(raw, source=str(args.weights))


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


class Sampler:
    """The model on this rank's shards, in the sampling precision, and what turns its outputs into uint8 images."""

    def __init__(self, config, weights: dict, groups, device):
        from diffmoe_scale.data import build_dataset
        from diffmoe_scale.data.vae import load_vae
        from diffmoe_scale.diffusion import build_objective
        from diffmoe_scale.models import build_model
        from diffmoe_scale.parallel.parallelize import parallelize
        from diffmoe_scale.parallel.precision import PRECISION_DTYPES, CastAtModelBoundary
        from diffmoe_scale.train.calibration import calibrate_thresholds

        self.config, self.groups, self.device = config, groups, device
        self.precision = resolve_precision(config.sample.precision, device)
        model = build_model(config)
        load_ema_weights(model, weights, config.sample.thresholds)
        self.model = parallelize(model.to(device), config, groups).eval()
        if config.sample.thresholds == "calibrate":
            calibrate_thresholds(self.model, config, groups, device, build_dataset(config))
        dtype = PRECISION_DTYPES[self.precision]
        self.forward = self.model if dtype == torch.float32 else CastAtModelBoundary(self.model.to(dtype), dtype)
        self.objective = build_objective(config)
        self.vae = None
        if config.data.dataset == "latents":
            if not config.data.vae:
                raise ConfigError("--vae: the model generates VAE latents; give the AutoencoderKL to decode them "
                                  "(or set data.vae)")
            self.vae = load_vae(config.data.vae, device)
        self.base_thresholds = [layer.thresholds.clone() for layer in self.threshold_layers()]

    def threshold_layers(self):
        return [layer for layer in self.model.moe_layers() if hasattr(layer, "thresholds")]

    def set_threshold_offset(self, offset: float) -> None:
        for layer, base in zip(self.threshold_layers(), self.base_thresholds):
            layer.thresholds.copy_(base + offset)

    @torch.no_grad()
    def rows(self, start: int, count: int, seed: int) -> tuple[np.ndarray, list[float]]:
        """Samples start .. start+count-1 as uint8 [count, H, W, C] and the C_avg of each MoE layer call; the
        other ranks of this rank's EP group sample the rest of the token pool at the same time."""
        from diffmoe_scale.data.vae import decode_latents
        from diffmoe_scale.eval.sample_shards import expected_labels
        from diffmoe_scale.parallel.sampling import sample_rows

        config = self.config
        labels = torch.from_numpy(expected_labels(start, start + count, config.model.num_classes)).to(self.device)
        size, channels = config.model.input_size, config.model.in_channels
        noise = torch.stack([torch.randn(channels, size, size, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                             for i in range(start, start + count)]).to(self.device)
        torch.manual_seed(seed * 1_000_003 + start)  # ancestral sampling draws from the global RNG
        latents, c_avgs = sample_rows(self.forward, self.objective, config.sample, labels, noise)
        pixels = decode_latents(self.vae, latents) if self.vae else latents.float()
        pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        return pixels.cpu().numpy(), c_avgs


def identity(args, config: Config, step: int, precision: str, offset: float, seed: int) -> dict:
    """What fixes the samples of a shard directory (not their number: more samples extend fewer)."""
    sample = config.sample
    return {"weights": str(args.weights.resolve()), "step": step, "seed": seed, "batch_size": args.batch_size,
            "sampler": sample.sampler, "steps": sample.steps, "cfg_scale": sample.cfg_scale, "precision": precision,
            "threshold_offset": offset, "inference_routing": config.moe.inference_routing, "vae": config.data.vae}


def build_evaluator(args):
    if args.digits:
        from diffmoe_scale.eval.evaluators import DigitsEvaluator

        return DigitsEvaluator(), "digit_fid"
    if args.inception and args.reference:
        from diffmoe_scale.eval.evaluators import InceptionEvaluator

        return InceptionEvaluator(args.inception, args.reference), "fid"
    raise ConfigError("--search-offsets: score the search with --digits, or --inception and --reference")


def search_offset(run, args, is_main: bool) -> tuple[float | None, int]:
    """(the offset of the lowest score among the candidates, 0), or (None, exit code) when stopped. Each
    candidate's samples are sharded like the final ones (a rerun reuses them); rank 0 scores them."""
    from diffmoe_scale.eval.sample_shards import merge_shards
    from diffmoe_scale.parallel.collectives import broadcast_object

    low, high, count = args.search_offsets.split(":")
    candidates = np.linspace(float(low), float(high), int(count)).tolist()
    evaluator, metric = build_evaluator(args) if is_main else (None, None)
    results = []
    for k, offset in enumerate(candidates):
        directory = args.out / "search" / f"offset_{k}"
        code = run(directory, args.search_samples, args.seed + 1, offset)
        if code:
            return None, code
        score = None
        if is_main:
            merged = directory / "samples.npz"
            _, c_avg = merge_shards(directory / "shards", args.search_samples, merged)
            with np.load(merged) as data:
                score = evaluator(data["arr_0"], data["arr_1"])[metric]
            print(f"threshold offset {offset:+.4f}: {metric} {score:.4f}, C_avg {c_avg or 1:.3f}", flush=True)
        results.append((broadcast_object(score), offset))
    return min(results)[1], 0


def finish(args, config: Config, step: int, offset: float, precision: str) -> None:
    """Rank 0: merge the shards into samples.npz, and write grid.png and sampling.json."""
    from diffmoe_scale.eval.sample_shards import merge_shards
    from diffmoe_scale.train.images import grid_classes, save_grid

    num_classes, count = config.model.num_classes, args.num_samples
    classes = [c for c in grid_classes(num_classes, config.sample.grid_classes) if c < count]
    per_class = min(args.grid, (count - max(classes) - 1) // num_classes + 1)
    wanted = [c + k * num_classes for c in classes for k in range(per_class)]
    kept, c_avg = merge_shards(args.out / "shards", count, args.out / "samples.npz", keep=set(wanted))
    grid = torch.from_numpy(np.stack([kept[i] for i in wanted])).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_grid(grid, rows=len(classes), path=args.out / "grid.png")
    summary = {"weights": str(args.weights), "step": step, "num_samples": count,
               "thresholds": config.sample.thresholds, "threshold_offset": offset,
               "c_avg": c_avg if c_avg is not None else 1.0, "sampler": config.sample.sampler,
               "steps": config.sample.steps, "cfg_scale": config.sample.cfg_scale, "precision": precision,
               "batch_size": args.batch_size, "seed": args.seed}
    (args.out / "sampling.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out / 'samples.npz'} ({count} images, step {step}, inference C_avg {summary['c_avg']:.3f}, "
          f"threshold offset {offset:+.4f}, {precision})", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        saved_config, weights, step = read_ema_weights(args.weights)
        config = sampling_config(saved_config, args)
        if args.batch_size % args.ep:
            raise ConfigError(f"--batch-size: {args.batch_size} samples per token pool do not split over --ep {args.ep}")
    except (ValueError, ConfigError) as err:
        report_error(f"error: {err}")
        report_exit_status(2)
        return 2
    from diffmoe_scale.train.stop import StopRequest

    stop = StopRequest(unit="batch")  # before distributed start-up: from here on a stop signal asks for a stop
    tie_to_launcher()
    from diffmoe_scale.eval.sampling_run import Layout, sample_pools
    from diffmoe_scale.parallel.groups import setup_groups
    from diffmoe_scale.parallel.launcher import exit_process
    from diffmoe_scale.parallel.runtime import init_runtime, shutdown_runtime

    runtime = init_runtime()
    try:
        groups = setup_groups(config)
        sampler = Sampler(config, weights, groups, runtime.device)
        layout = Layout.of(runtime, groups)

        def run(directory: Path, count: int, seed: int, offset: float) -> int:
            sampler.set_threshold_offset(offset)
            settings = identity(args, config, step, sampler.precision, offset, seed)
            return sample_pools(sampler, directory / "shards", settings, count, args.batch_size, seed, layout, stop,
                                runtime.device)

        offset, code = search_offset(run, args, runtime.is_main) if args.search_offsets else (args.threshold_offset, 0)
        code = code or run(args.out, args.num_samples, args.seed, offset)
    except ConfigError as err:
        report_error(f"error: {err}")
        exit_process(2)
    if code and runtime.is_main:
        print(f"stopped; the same command continues from {args.out}", flush=True)
    elif runtime.is_main:
        finish(args, config, step, offset, sampler.precision)
    stop.restore()
    shutdown_runtime()
    exit_process(code)


if __name__ == "__main__":
    sys.exit(main())
