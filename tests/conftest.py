"""Fixtures several test files share: a tiny ImageFolder and a tiny randomly initialised VAE."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import CLASSES, SIZES


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir()
        for i, size in enumerate(SIZES):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "owl" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=16)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path
