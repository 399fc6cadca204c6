"""Fixtures several test files share: this process as a world of one, a tiny ImageFolder, a tiny randomly
initialised VAE, and a short digits run with its EMA weights exported."""
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image

from tests.helpers import CLASSES, SIZES, clean_env, train_and_export_ema

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """The scripts the tests start import diffmoe_scale as any process does: from PYTHONPATH or the venv's
    editable install. Stop at once unless that is this checkout (a venv set up from another checkout would
    have them test its code)."""
    with tempfile.TemporaryDirectory() as elsewhere:
        found = subprocess.run([sys.executable, "-c", "import diffmoe_scale; print(diffmoe_scale.__file__)"],
                               cwd=elsewhere, env=clean_env(), capture_output=True, text=True, timeout=60)
    if found.returncode != 0:
        raise pytest.UsageError(f"diffmoe_scale is not installed in {sys.prefix}: run `bash launch/bootstrap.sh`")
    if Path(found.stdout.strip()).parent != REPO / "diffmoe_scale":
        raise pytest.UsageError(f"the scripts would import diffmoe_scale from {Path(found.stdout.strip()).parent}, "
                                f"not from this checkout ({REPO}): give it its own .venv (`bash launch/bootstrap.sh`) "
                                "or put it first on PYTHONPATH")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one core per worker, for its own torch and the ranks it starts
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        # xdist's workers run unbuffered, and the processes they start would inherit it: print() would then
        # write a line's text and its newline apart, and two ranks' lines on one pipe could interleave.
        os.environ.pop("PYTHONUNBUFFERED", None)


def pytest_collection_modifyitems(config, items):
    """Files with more slow tests first, so that the workers (pyproject.toml) end about together: a long
    file handed out last would leave the other workers idle."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


@pytest.fixture(scope="session")
def runtime():
    """This process as a world of one, for the tests that run the trainer or collectives in it."""
    from diffmoe_scale.parallel.runtime import init_runtime

    return init_runtime()


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


@pytest.fixture(scope="session")
def trained(runtime, tmp_path_factory) -> Path:
    """A short digits run, its final checkpoint consolidated and its EMA exported to ema.safetensors; made once
    for all workers (the first to need it makes it while the others wait)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the workers' common temporary directory, this session's
    out = shared / "trained_run"
    with FileLock(str(shared / "trained_run.lock")):
        if not (out / "ema.safetensors").is_file():
            train_and_export_ema(runtime, "configs/digits_diffmoe_e4_flow.yaml", out, steps=30)
    return out
