"""A checkpoint consolidated from its files resumes with the optimizer's state intact, also for torch's fused
AdamW (the one GPUs run), which keeps its step on the parameters' device. (Every layout's consolidation is
compared with what its ranks gather in tests/test_parallel.py.)"""
import json
from pathlib import Path

import torch

from diffmoe_scale.config import load_config
from diffmoe_scale.parallel import engine as engine_module
from diffmoe_scale.parallel.consolidate import _torch_optimizer
from diffmoe_scale.train.checkpoint import MANIFEST, read_consolidated
from diffmoe_scale.train.consolidation import write_consolidated

REPO = Path(__file__).resolve().parents[1]


def trainer_for(runtime, tmp_path):
    from diffmoe_scale.train.trainer import Trainer

    config = load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", [
        "train.global_batch_size=16", f"train.out_dir={tmp_path}", "model.depth=2", "optim.warmup_steps=0"])
    return Trainer(config, runtime)


def test_fused_adamw_state_round_trips_through_consolidation(runtime, tmp_path, monkeypatch):
    def fused(config, param_groups, device):
        optim = config.optim
        return torch.optim.AdamW(param_groups, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay,
                                 fused=True)

    monkeypatch.setattr(engine_module, "build_optimizer", fused)
    trained = trainer_for(runtime, tmp_path / "a")
    for _ in range(3):
        trained.train_step()
    trained.save_checkpoint()
    checkpoint = tmp_path / "a" / "checkpoints" / "step_00000003"
    (tmp_path / "consolidated").mkdir()
    write_consolidated(checkpoint, json.loads((checkpoint / MANIFEST).read_text()), tmp_path / "consolidated")
    assert read_consolidated(tmp_path / "consolidated")["adam_step"] == 3

    resumed = trainer_for(runtime, tmp_path / "b")
    resumed.load_consolidated(tmp_path / "consolidated")
    optimizer, theirs = _torch_optimizer(resumed.engine), _torch_optimizer(trained.engine)
    assert all(group["fused"] for group in optimizer.param_groups)
    assert {float(s["step"]) for s in optimizer.state.values()} == {3.0}
    for (name, param), (_, trained_param) in zip(resumed.model.named_parameters(), trained.model.named_parameters()):
        assert torch.equal(param, trained_param), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[param][key], theirs.state[trained_param][key]), f"{key} of {name}"
    assert [torch.equal(a, b) for a, b in zip(resumed.ema.shadow, trained.ema.shadow)] == [True] * len(trained.ema.shadow)
