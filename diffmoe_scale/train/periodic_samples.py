"""Sample grids from the EMA weights: every `sample.every_steps` steps while a run trains, and at its end.

A grid shows `sample.grid_classes` classes (spread over the labels: 10 of ImageNet's 1000, all 10 digits),
`sample.per_class` samples each, one row per class. Latent models are decoded through `data.vae` (a local
AutoencoderKL directory); without one the grid shows each latent's channels side by side in gray under a
caption that says so, in a file named `*_latent_channels.png`. Building the EMA model and sampling fork
the global RNG, so a run with grids trains exactly as one without.
"""
from pathlib import Path
from typing import Callable

import torch

from ..config import Config, ConfigError
from ..data.vae import decode_latents, load_vae
from ..parallel.sampling import sample_distributed
from .images import LATENT_RANGE, grid_classes, save_grid, save_latent_grid


class SampleGrids:
    def __init__(self, config: Config, groups, device: torch.device, objective, is_main: bool):
        self.config, self.groups, self.device, self.objective, self.is_main = config, groups, device, objective, is_main
        self.classes = grid_classes(config.model.num_classes, config.sample.grid_classes)
        self.latents = config.data.dataset == "latents"
        self.vae = None  # loaded on rank 0 when first needed
        vae = config.data.vae
        if self.latents and vae and not Path(vae).is_dir():
            raise ConfigError(f"data.vae: {vae} is not a directory (a local AutoencoderKL, as diffusers saves it)")
        if self.latents and not vae and is_main:
            print("data.vae is not set: sample grids show the latents channel by channel (*_latent_channels.png); "
                  "set data.vae to a local AutoencoderKL directory to decode them", flush=True)

    def due(self, step: int) -> bool:
        every = self.config.sample.every_steps
        return bool(every) and step % every == 0

    def labels(self) -> torch.Tensor:
        return torch.tensor(self.classes, device=self.device).repeat_interleave(self.config.sample.per_class)

    def write(self, ema_model: Callable[[], torch.nn.Module], stem: Path) -> Path | None:
        """A grid from the model `ema_model()` returns to `stem`.png, or `stem`_latent_channels.png (collective);
        returns the file on rank 0."""
        sample, model_config = self.config.sample, self.config.model
        labels = self.labels()
        generator = torch.Generator(device=self.device).manual_seed(sample.seed)
        size = model_config.input_size
        noise = torch.randn(len(labels), model_config.in_channels, size, size, generator=generator, device=self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            model = ema_model()
            torch.manual_seed(sample.seed)  # ancestral sampling draws from the global RNG
            images, c_avg = sample_distributed(model, self.objective, sample, self.groups, labels, noise)
        if not self.is_main:
            return None
        stem.parent.mkdir(parents=True, exist_ok=True)
        rows = len(self.classes)
        if self.latents and not self.config.data.vae:
            path = stem.with_name(stem.name + "_latent_channels.png")
            caption = (f"NOT IMAGES: {model_config.in_channels} latent channels per sample, gray -{LATENT_RANGE:g}..+"
                       f"{LATENT_RANGE:g} (no data.vae); classes {self.classes}")
            save_latent_grid(images, rows, path, caption)
        else:
            path = stem.with_suffix(".png")
            if self.latents:
                self.vae = self.vae or load_vae(self.config.data.vae, self.device)
                images = decode_latents(self.vae, images)
            save_grid(images, rows=rows, path=path)
        c_avg = f", inference C_avg {c_avg:.2f}" if c_avg is not None else ""
        print(f"samples: {path} ({len(labels)} images of classes {self.classes}, {sample.sampler} {sample.steps} steps, "
              f"cfg {sample.cfg_scale}{c_avg})", flush=True)
        return path
