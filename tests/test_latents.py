"""Latent extraction on a tiny randomly initialised AutoencoderKL and a tiny ImageFolder of
generated PNGs: the written latents are the VAE's encoding of the cropped images, extraction is
the same on one rank or two and resumes after losing a shard, and the trainer learns from them."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmoe_scale.config import ConfigError, load_config
from diffmoe_scale.data.extract import center_crop, load_image
from diffmoe_scale.data.latents import LatentShardDataset, build_latent_dataset, shard_name
from tests.helpers import CLASSES, SIZES, clean_env, read_metrics

REPO = Path(__file__).resolve().parents[1]


def extract(image_folder: Path, vae_dir: Path, out: Path, *extra: str, nproc: int = 1) -> str:
    args = ["launch/extract_latents.py", "--images", str(image_folder), "--out", str(out), "--vae", str(vae_dir),
            "--image-size", "16", "--shard-size", "5", "--batch-size", "3", *extra]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    result = subprocess.run([*launcher, *args], cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def shards(out: Path) -> list[np.ndarray]:
    index = json.loads((out / "index.json").read_text())
    return [np.load(out / shard["file"]) for shard in index["shards"]]


def test_center_crop_is_adm_crop():
    image = Image.fromarray(np.arange(100 * 60 * 3, dtype=np.uint8).reshape(60, 100, 3) % 251)
    cropped = center_crop(image, 16)
    # 100x60: box-halved once to 50x30 (30 < 2 x 16), bicubic to 27x16, then the central 16 columns.
    expected = image.resize((50, 30), Image.BOX).resize((27, 16), Image.BICUBIC)
    assert cropped.size == (16, 16)
    assert np.array_equal(np.asarray(cropped), np.asarray(expected.crop((5, 0, 21, 16))))


@pytest.mark.slow
def test_extracted_latents_are_the_vae_encoding_of_the_cropped_images(image_folder, vae_dir, tmp_path):
    from diffusers import AutoencoderKL

    extract(image_folder, vae_dir, tmp_path, "--posterior", "mean")
    index = json.loads((tmp_path / "index.json").read_text())
    assert (index["num_images"], index["classes"], index["latent_shape"]) == (12, CLASSES, [4, 8, 8])
    assert [s["count"] for s in index["shards"]] == [5, 5, 2] and index["flip"]
    assert np.load(tmp_path / "labels.npy").tolist() == [0] * 4 + [1] * 4 + [2] * 4
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    paths = [image_folder / name / f"{i}.png" for name in CLASSES for i in range(len(SIZES))]
    images = torch.stack([load_image(p, 16) for p in paths])
    with torch.no_grad():
        expected = [vae.encode(view).latent_dist.mean * vae.config.scaling_factor
                    for view in (images, images.flip(-1))]
    written = torch.from_numpy(np.concatenate(shards(tmp_path))).float()
    assert written.shape == (12, 2, 4, 8, 8)
    for variant in (0, 1):  # the image, then its mirror image
        torch.testing.assert_close(written[:, variant], expected[variant], atol=2e-3, rtol=2e-3)  # float16


@pytest.mark.slow
def test_two_ranks_write_what_one_does_and_a_lost_shard_is_redone(image_folder, vae_dir, latents_dir, tmp_path):
    one, two = latents_dir, tmp_path / "two"  # latents_dir: the same extraction on one rank
    extract(image_folder, vae_dir, two, nproc=2)
    assert all(np.array_equal(a, b) for a, b in zip(shards(one), shards(two), strict=True))
    (two / shard_name(1)).unlink()
    (two / "index.json").unlink()
    output = extract(image_folder, vae_dir, two)
    assert "2 of my 3 shards are done already" in output and "shard 1 (5 images" in output
    assert all(np.array_equal(a, b) for a, b in zip(shards(one), shards(two), strict=True))


@pytest.fixture(scope="module")
def latents_dir(image_folder, vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    extract(image_folder, vae_dir, out)
    return out


def latents_config(latents_dir: Path, out_dir: Path, *overrides: str):
    return load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", [
        "data.dataset=latents", f"data.path={latents_dir}", "data.hflip=true", "model.input_size=8",
        "model.in_channels=4", "model.num_classes=3", "train.global_batch_size=4", f"train.out_dir={out_dir}",
        *overrides])


@pytest.mark.slow
def test_dataset_reads_mirrored_latents_where_the_flip_bit_is_set(latents_dir, tmp_path):
    dataset = build_latent_dataset(latents_config(latents_dir, tmp_path))
    stored = np.concatenate(shards(latents_dir)).astype(np.float32)
    latents, labels = dataset.batch(torch.tensor([0, 6, 11]), torch.tensor([False, True, True]))
    assert torch.equal(latents, torch.from_numpy(stored[[0, 6, 11], [0, 1, 1]]))
    assert labels.tolist() == [0, 1, 2]
    unflipped = LatentShardDataset(latents_dir, hflip=False).batch(torch.tensor([6]), torch.tensor([True]))[0]
    assert torch.equal(unflipped[0], torch.from_numpy(stored[6, 0]))


@pytest.mark.slow
def test_latents_that_do_not_fit_the_model_are_a_config_error(latents_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model.input_size / model.in_channels: the latents .* are \[4, 8, 8\]"):
        build_latent_dataset(latents_config(latents_dir, tmp_path, "model.input_size=16"))
    with pytest.raises(ConfigError, match="model.num_classes: 10, but"):
        build_latent_dataset(latents_config(latents_dir, tmp_path, "model.num_classes=10"))
    with pytest.raises(ConfigError, match="holds no readable index.json"):
        build_latent_dataset(latents_config(tmp_path, tmp_path))


@pytest.mark.slow
def test_trainer_learns_from_extracted_latents(latents_dir, tmp_path):
    from diffmoe_scale.parallel.runtime import init_runtime
    from diffmoe_scale.train.trainer import Trainer

    config = latents_config(latents_dir, tmp_path, "train.max_steps=40", "logging.every_steps=1",
                            "optim.warmup_steps=0", "sample.steps=2", "sample.per_class=1")
    assert Trainer(config, init_runtime()).train() == 0
    losses = [record["loss"] for record in read_metrics(tmp_path)]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])


def test_sampler_resumes_exactly_and_ranks_split_the_global_batch():
    from diffmoe_scale.data import ShuffledBatchSampler

    straight = ShuffledBatchSampler(100, 12, seed=3)
    batches = [straight.next_indices() for _ in range(20)]  # 8 batches per epoch: crosses two epochs
    resumed = ShuffledBatchSampler(100, 12, seed=3)
    interrupted = ShuffledBatchSampler(100, 12, seed=3)
    for _ in range(11):
        interrupted.next_indices()
    resumed.load_state_dict(interrupted.state_dict())
    for indices, flips in batches[11:]:
        again = resumed.next_indices()
        assert torch.equal(again[0], indices) and torch.equal(again[1], flips)
    ranks = [ShuffledBatchSampler(100, 12, seed=3, rank=r, world_size=3) for r in range(3)]
    for indices, flips in batches[:3]:
        parts = [sampler.next_indices() for sampler in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), indices)
        assert torch.equal(torch.cat([p[1] for p in parts]), flips)
