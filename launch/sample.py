#!/usr/bin/env python
"""Class-conditional samples from trained EMA weights, over any number of ranks, for evaluation.

  python launch/sample.py --weights ema.safetensors --out samples/ --num-samples 50000 --vae /models/sd-vae-ft-ema
  torchrun --nproc_per_node 8 launch/sample.py --weights runs/x/checkpoints/step_07000000_consolidated --ep 8 ...
  python launch/sample.py --weights ema.safetensors --out s/ --digits --search-offsets=-0.1:0.1:5

--weights is what `launch/checkpoint.py export-ema` writes, or a consolidated checkpoint. Labels
cycle through the classes; the starting noise of sample i depends only on --seed and i, so the
deterministic samplers (euler, heun, ddim) give the same images on any number of ranks (DDPM's
ancestral sampler also draws fresh noise at every step, per rank). Writes samples.npz (ADM's layout: arr_0 uint8 [N, H, W, C],
arr_1 labels) and grid.png, and reports the inference C_avg. DiffMoE routes by its learned
thresholds; --threshold-offset adds a constant to all of them, and --search-offsets A:B:N first
samples --search-samples images at N offsets from A to B, scores them (--digits, or --inception with
--reference) and uses the best.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffmoe_scale.cli import docstring_parser, report_error
from diffmoe_scale.config import Config, ConfigError, config_from_dict
from diffmoe_scale.parallel.launcher import report_exit_status, tie_to_launcher
from diffmoe_scale.train.checkpoint import read_ema_weights


def parse_args(argv=None):
    parser = docstring_parser(__doc__)
    parser.add_argument("--weights", required=True, type=Path, help="exported EMA .safetensors or consolidated checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--num-samples", type=int, default=50000)
    parser.add_argument("--batch-size", type=int, default=256, help="samples per call, over all ranks")
    parser.add_argument("--sampler", help="default: the config's (flow: euler, heun; ddpm: ancestral, ddim)")
    parser.add_argument("--steps", type=int, help="default: the config's sample.steps")
    parser.add_argument("--cfg-scale", type=float, help="default: the config's sample.cfg_scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size for sampling (divides the ranks)")
    parser.add_argument("--vae", help="AutoencoderKL to decode latents (hub name or local dir); latent models only")
    parser.add_argument("--threshold-offset", type=float, default=0.0, help="added to every DiffMoE threshold")
    parser.add_argument("--search-offsets", metavar="A:B:N", help="try N offsets from A to B first, keep the best")
    parser.add_argument("--search-samples", type=int, default=1000, help="samples per offset in the search")
    parser.add_argument("--digits", action="store_true", help="score the search by digit FID")
    parser.add_argument("--inception", type=Path, help="score the search by FID with this Inception network")
    parser.add_argument("--reference", type=Path, help="reference statistics for --inception")
    parser.add_argument("--grid", type=int, default=8, help="samples per class in grid.png (at most 10 classes)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sampling_config(saved: dict, args) -> Config:
    """The training config with the sampling settings and layout of this run: the EMA weights are fp32,
    and sampling runs in fp32."""
    raw = {section: dict(values) for section, values in saved.items()}
    raw["parallel"] = {"ep": args.ep}
    raw["train"]["precision"] = "fp32"
    for key, value in (("sampler", args.sampler), ("steps", args.steps), ("cfg_scale", args.cfg_scale)):
        if value is not None:
            raw["sample"][key] = value
    return config_from_dict(raw, source=str(args.weights))


class Sampler:
    """The model on this rank's shards and what turns its outputs into uint8 images."""

    def __init__(self, config, weights: dict, groups, device, vae_name: str | None):
        from diffmoe_scale.diffusion import build_objective
        from diffmoe_scale.models import build_model
        from diffmoe_scale.parallel.parallelize import parallelize

        self.config, self.groups, self.device = config, groups, device
        model = build_model(config)
        model.load_state_dict(weights)
        self.model = parallelize(model.to(device), config, groups).eval()
        self.objective = build_objective(config)
        self.vae = None
        if config.data.dataset == "latents":
            if not vae_name:
                raise ConfigError("--vae: the model generates VAE latents; give the AutoencoderKL to decode them")
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(vae_name).to(device).eval()
        self.base_thresholds = [layer.thresholds.clone() for layer in self.threshold_layers()]

    def threshold_layers(self):
        return [layer for layer in self.model.moe_layers() if hasattr(layer, "thresholds")]

    def set_threshold_offset(self, offset: float) -> None:
        for layer, base in zip(self.threshold_layers(), self.base_thresholds):
            layer.thresholds.copy_(base + offset)

    @torch.no_grad()
    def images(self, start: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, float | None]:
        """Samples start .. start+count-1 as uint8 [count, H, W, C], their labels, and the C_avg."""
        from diffmoe_scale.parallel.sampling import sample_distributed

        config = self.config
        indices = torch.arange(start, start + count)
        labels = (indices % config.model.num_classes).to(self.device)
        size, channels = config.model.input_size, config.model.in_channels
        noise = torch.stack([torch.randn(channels, size, size, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                             for i in indices.tolist()]).to(self.device)
        torch.manual_seed(seed * 1_000_003 + start)  # ancestral sampling draws from the global RNG
        latents, c_avg = sample_distributed(self.model, self.objective, config.sample, self.groups, labels, noise)
        pixels = self.vae.decode(latents / self.vae.config.scaling_factor).sample if self.vae else latents
        pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        return pixels.cpu().numpy(), labels.cpu().numpy(), c_avg

    def run(self, num_samples: int, batch_size: int, seed: int, progress: bool) -> tuple[np.ndarray, np.ndarray, float]:
        parts, labels, c_avgs, began = [], [], [], time.perf_counter()
        for start in range(0, num_samples, batch_size):
            images, part_labels, c_avg = self.images(start, min(batch_size, num_samples - start), seed)
            parts.append(images)
            labels.append(part_labels)
            c_avgs.append(c_avg if c_avg is not None else 1.0)
            if progress:
                done = start + len(images)
                print(f"sampled {done}/{num_samples} ({done / (time.perf_counter() - began):.1f} images/s, "
                      f"C_avg {np.mean(c_avgs):.3f})", flush=True)
        return np.concatenate(parts), np.concatenate(labels), float(np.mean(c_avgs))


def build_evaluator(args):
    if args.digits:
        from diffmoe_scale.eval.evaluators import DigitsEvaluator

        return DigitsEvaluator(), "digit_fid"
    if args.inception and args.reference:
        from diffmoe_scale.eval.evaluators import InceptionEvaluator

        return InceptionEvaluator(args.inception, args.reference), "fid"
    raise ConfigError("--search-offsets: score the search with --digits, or --inception and --reference")


def search_offset(sampler: Sampler, args, is_main: bool) -> float:
    """The offset of the lowest score among the candidates (the score is computed on rank 0 and shared)."""
    from diffmoe_scale.parallel.collectives import broadcast_object

    low, high, count = args.search_offsets.split(":")
    candidates = np.linspace(float(low), float(high), int(count)).tolist()
    evaluator, metric = build_evaluator(args) if is_main else (None, None)
    results = []
    for offset in candidates:
        sampler.set_threshold_offset(offset)
        images, labels, c_avg = sampler.run(args.search_samples, args.batch_size, args.seed + 1, progress=False)
        score = broadcast_object(evaluator(images, labels)[metric] if is_main else None)
        results.append((score, offset))
        if is_main:
            print(f"threshold offset {offset:+.4f}: {metric} {score:.4f}, C_avg {c_avg:.3f}", flush=True)
    return min(results)[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        saved_config, weights, step = read_ema_weights(args.weights)
        config = sampling_config(saved_config, args)
    except (ValueError, ConfigError) as err:
        report_error(f"error: {err}")
        report_exit_status(2)
        return 2
    tie_to_launcher()
    from diffmoe_scale.parallel.groups import setup_groups
    from diffmoe_scale.parallel.runtime import exit_process, init_runtime, shutdown_runtime
    from diffmoe_scale.train.images import save_grid

    runtime = init_runtime()
    try:
        sampler = Sampler(config, weights, setup_groups(config), runtime.device, args.vae)
        offset = search_offset(sampler, args, runtime.is_main) if args.search_offsets else args.threshold_offset
    except ConfigError as err:
        report_error(f"error: {err}")
        exit_process(2)
    sampler.set_threshold_offset(offset)
    images, labels, c_avg = sampler.run(args.num_samples, args.batch_size, args.seed, progress=runtime.is_main)
    if runtime.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez(args.out / "samples.npz", images, labels)
        classes = min(config.model.num_classes, 10)
        per_class = min(args.grid, min(int((labels == c).sum()) for c in range(classes)))
        grid = [i for c in range(classes) for i in np.flatnonzero(labels == c)[:per_class]]
        save_grid(torch.from_numpy(images[grid]).permute(0, 3, 1, 2).float() / 127.5 - 1, rows=classes,
                  path=args.out / "grid.png")
        summary = {"weights": str(args.weights), "step": step, "num_samples": len(images), "threshold_offset": offset,
                   "c_avg": c_avg, "sampler": config.sample.sampler, "steps": config.sample.steps,
                   "cfg_scale": config.sample.cfg_scale}
        (args.out / "sampling.json").write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.out / 'samples.npz'} ({len(images)} images, step {step}, inference C_avg {c_avg:.3f}, "
              f"threshold offset {offset:+.4f})", flush=True)
    shutdown_runtime()
    exit_process(0)


if __name__ == "__main__":
    sys.exit(main())
