"""Whole-tensor training state (what resharding goes through) from a training process, in one process:
every Adam moment is there whatever the ZeRO stage, and the optimizer's step survives the round trip with
torch's fused AdamW (the one GPUs run), whose step lives on the device."""
from pathlib import Path

import pytest
import torch

from diffmoe_scale.config import load_config
from diffmoe_scale.parallel import engine as engine_module
from diffmoe_scale.parallel.consolidate import _torch_optimizer
from diffmoe_scale.train.checkpoint import CONSOLIDATED_FILE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runtime():
    from diffmoe_scale.parallel.runtime import init_runtime

    return init_runtime()


def trainer_for(runtime, tmp_path, *overrides):
    from diffmoe_scale.train.trainer import Trainer

    config = load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", [
        "train.global_batch_size=16", f"train.out_dir={tmp_path}", "model.depth=2", *overrides])
    return Trainer(config, runtime)


@pytest.mark.parametrize("overrides", [["parallel.zero_stage=2"], ["parallel.zero_stage=1", "train.precision=bf16"]],
                         ids=["zero2", "zero1-bf16"])
def test_a_training_process_consolidates_every_adam_moment(runtime, tmp_path, overrides):
    """ZeRO steps its parameter groups (dense, experts) one at a time and links its per-parameter views of
    the Adam state after the first: consolidation must see the state of every group."""
    trainer = trainer_for(runtime, tmp_path, "optim.warmup_steps=0", *overrides)
    for _ in range(3):
        trainer.train_step()
    state = trainer.consolidated_state()
    assert state["adam_step"] == 3
    optimizer = _torch_optimizer(trainer.engine)
    names = {id(param): name for name, param in trainer.model.named_parameters()}
    for group, groups_params in zip(optimizer.param_groups, trainer.engine.optimizer.bit16_groups if hasattr(
            trainer.engine.optimizer, "bit16_groups") else trainer.engine.optimizer.bf16_groups):
        (flat,) = group["params"]  # one rank: the partition is the whole group
        for key in ("exp_avg", "exp_avg_sq"):
            gathered = sum(state["moments"][names[id(p)]][key].double().sum() for p in groups_params)
            assert gathered.item() == pytest.approx(optimizer.state[flat][key].double().sum().item(), rel=1e-6), key


def test_fused_adamw_state_round_trips_through_consolidation(runtime, tmp_path, monkeypatch):
    def fused(config, param_groups, device):
        optim = config.optim
        return torch.optim.AdamW(param_groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay,
                                 fused=True)

    monkeypatch.setattr(engine_module, "build_optimizer", fused)
    trained = trainer_for(runtime, tmp_path / "a")
    for _ in range(3):
        trained.train_step()
    state = trained.consolidated_state()
    assert state["adam_step"] == 3
    (tmp_path / "consolidated").mkdir()
    torch.save(state, tmp_path / "consolidated" / CONSOLIDATED_FILE)

    resumed = trainer_for(runtime, tmp_path / "b")
    resumed.load_consolidated(tmp_path / "consolidated")
    optimizer = resumed.engine.optimizer
    assert all(group["fused"] for group in optimizer.param_groups)
    assert {float(s["step"]) for s in optimizer.state.values()} == {3.0}
    for (name, param), (_, theirs) in zip(resumed.model.named_parameters(), trained.model.named_parameters()):
        assert torch.equal(param, theirs), name
        assert torch.equal(optimizer.state[param]["exp_avg"], trained.engine.optimizer.state[theirs]["exp_avg"]), name
