"""The EMA model's DiffMoE thresholds (`sample.thresholds`): copied from the trained model, averaged
with the weights' decay (the DiffMoE authors' EMA), or calibrated on the EMA weights' own capacity
predictor. In process, on a short digits run of the real trainer."""
from pathlib import Path

import pytest
import torch

from diffmoe_scale.config import ConfigError, load_config
from diffmoe_scale.models import build_model
from diffmoe_scale.train.ema_thresholds import averaged_name, load_ema_weights
from tests.helpers import launch_tool

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/digits_diffmoe_e4_flow.yaml"
DECAY = 0.7  # far from 1: after a few steps the average is far from the trained thresholds


def trainer_for(runtime, out, *overrides):
    from diffmoe_scale.train.trainer import Trainer

    config = load_config(CONFIG, ["train.global_batch_size=32", "model.depth=2", f"train.ema_decay={DECAY}",
                                  f"train.out_dir={out}", "checkpoint.every_steps=0", *overrides])
    return Trainer(config, runtime)


def thresholds(model) -> list[torch.Tensor]:
    return [layer.thresholds.clone() for layer in model.moe_layers()]


def test_average_is_the_ema_of_the_thresholds_and_copy_is_the_trained_tau(runtime, tmp_path):
    trainer = trainer_for(runtime, tmp_path)
    reference = thresholds(trainer.model)  # zeros: the EMA starts as a copy of the model
    for _ in range(5):
        trainer.train_step()
        reference = [DECAY * ref + (1 - DECAY) * tau for ref, tau in zip(reference, thresholds(trainer.model))]
    trained = thresholds(trainer.model)
    for mode, expected in (("average", reference), ("copy", trained)):
        trainer.config.sample.thresholds = mode
        ours = thresholds(trainer.filled_ema_model())
        for layer, (mine, theirs) in enumerate(zip(ours, expected, strict=True)):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0, msg=f"{mode}: MoE layer {layer}")
    assert all((ref - tau).abs().min() > 1e-3 for ref, tau in zip(reference, trained))  # the two differ


def capacity_on_fresh_batches(trainer, model, batches=4) -> float:
    """Inference C_avg of `model` on training-like batches that neither training nor calibration drew."""
    from diffmoe_scale.data import ShuffledBatchSampler
    from diffmoe_scale.train.batches import dropped_labels, rank_batch

    config = trainer.config
    sampler = ShuffledBatchSampler(len(trainer.dataset), config.train.global_batch_size, 99, 0, 1)
    c_avgs = []
    with torch.no_grad():
        for _ in range(batches):
            images, labels, draws = rank_batch(config, trainer.dataset, trainer.objective, sampler, 0, "cpu", 99)
            t = draws["t"].view(-1, 1, 1, 1)
            model(t * images + (1 - t) * draws["noise"], draws["t"], dropped_labels(labels, draws["drop"], 10))
            c_avgs += [layer.capacity_per_expert().mean().item() for layer in model.moe_layers()]
    return sum(c_avgs) / len(c_avgs)


def test_calibrated_thresholds_give_the_training_capacity_at_inference(runtime, tmp_path):
    trainer = trainer_for(runtime, tmp_path, "moe.capacity=1.5", "sample.calibration_batches=4")
    for _ in range(8):
        trainer.train_step()
    c_avg = {}
    for mode in ("copy", "calibrate"):
        trainer.config.sample.thresholds = mode
        c_avg[mode] = capacity_on_fresh_batches(trainer, trainer.filled_ema_model())
    print(f"inference C_avg at training capacity 1.5: {c_avg}")
    assert c_avg["calibrate"] == pytest.approx(1.5, rel=0.1)
    # After 8 steps the trained thresholds have moved only part of the way from 0 (EMA 0.95): far too many tokens.
    assert c_avg["copy"] > 2.0


def test_resume_and_consolidation_keep_the_averaged_thresholds_bit_exact(runtime, tmp_path):
    from safetensors.torch import load_file

    trainer = trainer_for(runtime, tmp_path)
    for _ in range(3):
        trainer.train_step()
    trainer.save_checkpoint()
    saved = {name: average.clone() for name, average in trainer.ema.buffer_averages.items()}
    assert all((average != trainer.ema.buffers[name]).any() for name, average in saved.items())
    trainer.train_step()  # moves the averages on: the resume must bring back the saved ones

    sharded = tmp_path / "checkpoints" / "step_00000003"
    resumed = trainer_for(runtime, tmp_path)
    resumed.resume(str(sharded))
    for name, average in saved.items():
        assert torch.equal(resumed.ema.buffer_averages[name], average), name

    launch_tool("checkpoint", "consolidate", str(sharded))
    consolidated = sharded.with_name(sharded.name + "_consolidated")
    from_consolidated = trainer_for(runtime, tmp_path / "other")
    from_consolidated.resume(str(consolidated))
    for name, average in saved.items():
        assert torch.equal(from_consolidated.ema.buffer_averages[name], average), name

    launch_tool("checkpoint", "export-ema", str(sharded), "--out", str(tmp_path / "ema.safetensors"))
    weights = load_file(tmp_path / "ema.safetensors")  # what launch/sample.py reads
    model = build_model(trainer.config)
    load_ema_weights(model, weights, "average")
    plain = {name.replace("deepspeed_moe.", ""): average for name, average in saved.items()}
    for name, buffer in model.state_dict().items():
        if name in plain:
            assert torch.equal(buffer, plain[name]), name
    with pytest.raises(ConfigError, match="no averaged thresholds"):
        load_ema_weights(model, {name: w for name, w in weights.items() if not name.endswith(".average")}, "average")
    assert all(averaged_name(name) in weights for name in plain)
