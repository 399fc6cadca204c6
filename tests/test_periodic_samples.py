"""Sample grids while a run trains (sample.every_steps) leave the run's numbers unchanged; latent grids are
decoded through data.vae (a tiny random AutoencoderKL saved locally) or, without one, written as labelled
grayscale channel grids, never as an RGBA picture; a grid shows a few classes, not all of ImageNet's."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmoe_scale.config import load_config
from diffmoe_scale.train.images import grid_canvas, grid_classes
from tests.helpers import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/digits_diffmoe_e4_flow.yaml"
TINY = ["model.depth=2", "model.hidden_size=32", "train.global_batch_size=16", "train.max_steps=4",
        "logging.every_steps=1", "checkpoint.every_steps=0", "sample.steps=1", "sample.per_class=1"]


def train(out_dir: Path, runtime, *overrides: str) -> tuple[list[dict], torch.Tensor]:
    """The run's metrics and the global RNG state its last checkpoint holds."""
    from diffmoe_scale.train.checkpoint import rank_state_name
    from diffmoe_scale.train.trainer import Trainer

    config = load_config(CONFIG, [*TINY, f"train.out_dir={out_dir}", *overrides])
    assert Trainer(config, runtime).train() == 0
    state = torch.load(out_dir / "checkpoints" / "step_00000004" / rank_state_name(0), map_location="cpu",
                       weights_only=False)
    return read_metrics(out_dir), state["rng"]["torch"]


@pytest.mark.slow
def test_grids_while_training_leave_the_run_unchanged(runtime, tmp_path, capsys):
    plain, plain_rng = train(tmp_path / "plain", runtime)
    with_grids, grids_rng = train(tmp_path / "grids", runtime, "sample.every_steps=2")
    keys = ("loss", "predictor_loss", "grad_norm", "c_avg")
    assert [[r[k] for k in keys] for r in with_grids] == [[r[k] for k in keys] for r in plain]
    assert torch.equal(grids_rng, plain_rng)
    assert sorted(p.name for p in (tmp_path / "grids" / "samples").iterdir()) == ["step_00000002.png",
                                                                                   "step_00000004.png"]
    assert not (tmp_path / "plain" / "samples").exists()
    grid = Image.open(tmp_path / "grids" / "samples" / "step_00000002.png")
    assert grid.mode == "L" and grid.size == (8 * 4 + 2, 10 * (8 * 4 + 1) + 1)  # 10 digits, one per row
    assert "samples: " + str(tmp_path / "grids" / "samples" / "step_00000004.png") in capsys.readouterr().out


def test_a_grid_shows_a_few_classes_spread_over_the_labels():
    assert grid_classes(1000, 8) == [0, 143, 285, 428, 571, 714, 856, 999]
    assert grid_classes(10, 10) == list(range(10)) and grid_classes(3, 10) == [0, 1, 2] and grid_classes(5, 1) == [0]


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    """Random 4x8x8 latents of 3 classes in launch/extract_latents.py's layout."""
    root = tmp_path_factory.mktemp("latents")
    count = 12
    np.save(root / "shard_00000.npy", np.random.default_rng(0).standard_normal((count, 1, 4, 8, 8)).astype(np.float16))
    np.save(root / "labels.npy", np.arange(count, dtype=np.int64) % 3)
    index = {"format": 1, "num_images": count, "latent_shape": [4, 8, 8], "flip": False, "vae": "random",
             "scale_factor": 0.18215, "image_size": 16, "posterior": "mean", "seed": 0, "classes": ["a", "b", "c"],
             "shards": [{"file": "shard_00000.npy", "count": count}]}
    (root / "index.json").write_text(json.dumps(index))
    return root


def latent_grids(latents: Path, runtime, stem: Path, *overrides: str):
    """SampleGrids of a tiny latent model, the model, and the grid written to `stem`."""
    from diffmoe_scale.diffusion import build_objective
    from diffmoe_scale.parallel.groups import setup_groups
    from diffmoe_scale.parallel.parallelize import build_parallel_model
    from diffmoe_scale.train.periodic_samples import SampleGrids

    config = load_config(CONFIG, [*TINY, "data.dataset=latents", f"data.path={latents}", "model.input_size=8",
                                  "model.in_channels=4", "model.num_classes=3", "sample.per_class=2", *overrides])
    groups = setup_groups(config)
    model = build_parallel_model(config, groups, runtime.device).eval()
    grids = SampleGrids(config, groups, runtime.device, build_objective(config), is_main=True)
    return grids, model, grids.write(lambda: model, stem)


def test_latent_grids_without_a_vae_are_labelled_channel_grids(latents, runtime, tmp_path, capsys):
    grids, _, path = latent_grids(latents, runtime, tmp_path / "samples")
    assert path == tmp_path / "samples_latent_channels.png" and not (tmp_path / "samples.png").exists()
    assert "data.vae is not set" in capsys.readouterr().out
    picture = Image.open(path)
    assert picture.mode == "L"  # gray tiles, never a 4-channel latent shown as RGBA
    assert picture.size[1] == 14 + 3 * (8 * 4 + 1) + 1  # caption, then one row per class
    caption = np.asarray(picture)[:14]
    assert (caption < 128).any()  # the caption's text is there


def test_latent_grids_are_decoded_through_data_vae(latents, vae_dir, runtime, tmp_path):
    from diffmoe_scale.data.vae import decode_latents, load_vae
    from diffmoe_scale.parallel.sampling import sample_distributed

    grids, model, path = latent_grids(latents, runtime, tmp_path / "samples", f"data.vae={vae_dir}")
    assert path == tmp_path / "samples.png"
    picture = np.asarray(Image.open(path))
    config = grids.config
    labels = grids.labels()
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    noise = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(config.sample.seed))
    sampled, _ = sample_distributed(model, grids.objective, config.sample, grids.groups, labels, noise)
    expected = grid_canvas(decode_latents(load_vae(str(vae_dir), runtime.device), sampled), rows=3)
    assert picture.shape == (3 * (16 * 4 + 1) + 1, 2 * (16 * 4 + 1) + 1, 3) and np.array_equal(picture, expected)


def test_decoding_undoes_the_latent_scale_in_batches(vae_dir):
    from diffmoe_scale.data.vae import decode_latents, load_vae

    vae = load_vae(str(vae_dir), torch.device("cpu"))
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    assert torch.allclose(decode_latents(vae, latents, batch_size=2), direct, atol=1e-6)
