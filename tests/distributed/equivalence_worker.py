"""Runs cases of a few training steps of the real trainer, one after the other in the same ranks, and saves
from rank 0, per case, what the equivalence tests compare: per-step global losses and gradient norms, the
first step's routing and full gradients, and the final full parameters, EMA and thresholds of every rank;
with "consolidation" also its checkpoint and the whole state its ranks gather (tests/distributed/gather.py).

    torchrun --nproc_per_node 2 tests/distributed/equivalence_worker.py OUT_DIR CASES.json --config C

CASES.json: [{"name": N, "overrides": ["parallel.ep=2", ...], "consolidation": false,
"checkpoint_dir": null, "compile_backend": "inductor", "sampling": true}, ...]; each case writes OUT_DIR/N.pt
(compile_backend: of train.compile; sampling: from the EMA, after the steps). Each case gets DeepSpeed expert
groups of its own layout (DeepSpeed caches them per process by EP size only); a tensor-parallel case goes last
(its megatron-core groups stay).
"""
import argparse
import gc
import json
from pathlib import Path

import torch
from deepspeed.utils import groups as ds_groups

from diffmoe_scale.config import load_config
from diffmoe_scale.models import DiT
from diffmoe_scale.parallel import compile as compile_module
from diffmoe_scale.parallel.collectives import all_gather
from diffmoe_scale.parallel.engine import grad_square_sums
from diffmoe_scale.parallel.launcher import exit_process
from diffmoe_scale.parallel.runtime import init_runtime, shutdown_runtime
from diffmoe_scale.parallel.sampling import sample_distributed
from diffmoe_scale.train.trainer import Trainer, capacity_stats, mean_over_ranks
from gather import full_state, gathered_state  # beside this file


STEPS = 3
DIT_INIT = DiT._init_weights


def init_away_from_zero(model):
    """DiT's adaLN-Zero init makes every block the identity: experts, router and attention would get
    zero gradients at first and an equivalence test could not see them. Move the zero-initialised
    modulation and output layers to small random values (same seed on every rank)."""
    DIT_INIT(model)
    for name, param in model.named_parameters():
        if "adaLN_modulation" in name or "final_layer" in name:
            torch.nn.init.normal_(param, std=0.02)


def routing_masks(trainer, micro_tokens: int) -> list:
    """Per MoE layer, the [pool tokens, E] routing mask of the last forward."""
    masks = []
    for layer in trainer.model.moe_layers():
        pair_expert, pair_token = layer.last_pairs
        mask = torch.zeros(micro_tokens * layer.dispatch.size, layer.num_experts, dtype=torch.bool)
        mask[pair_token, pair_expert] = True
        masks.append(mask)
    return masks


def rows_sent(trainer) -> list:
    """Per MoE layer, [rank, peer] token rows its dispatch sent so far (every rank's counts)."""
    counts = []
    for layer in trainer.model.moe_layers():
        sent = torch.tensor(getattr(layer.dispatch, "rows_sent", [0]))
        counts.append(torch.stack(all_gather(sent)))
    return counts


def gather_ranks(tensor):
    """[world size, ...]: every rank's copy of `tensor`."""
    return torch.stack(all_gather(tensor))


def save_and_reload(trainer, directory: str) -> list[str]:
    """Save a DeepSpeed checkpoint, load it back and check the parameters came back unchanged."""
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.engine.save_checkpoint(directory, tag="step3")
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.zero_()
    trainer.engine.load_checkpoint(directory, tag="step3")
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} did not come back from the checkpoint"
    return sorted(path.name for path in (Path(directory) / "step3").iterdir())


def sample(ema_model, trainer, config):
    """Samples of 8 fixed noises and labels in the config's sampler steps, and their inference C_avg."""
    for layer in ema_model.moe_layers():  # mid-range thresholds: experts take different token counts
        layer.thresholds.fill_(0.5)
    labels = torch.arange(8) % config.model.num_classes
    noise = torch.randn(8, config.model.in_channels, 8, 8, generator=torch.Generator().manual_seed(5))
    return sample_distributed(ema_model, trainer.objective, config.sample, trainer.groups, labels, noise)


def run_case(trainer, config, case: dict) -> dict:
    record = {"loss": [], "grad_norm": [], "world_size": trainer.groups.world_size}
    tokens_per_micro = (config.train.global_batch_size // trainer.groups.dp_size // config.train.grad_accum_steps
                        * trainer.tokens_per_image)
    original_step = trainer.engine.step

    def step_and_capture():  # the first optimizer step's gradients, before DeepSpeed applies them
        if trainer.step == 0 and trainer.engine.is_gradient_accumulation_boundary() and "masks" not in record:
            record["masks"] = routing_masks(trainer, tokens_per_micro)
            record["rows_sent"] = rows_sent(trainer)
            if config.parallel.zero_stage == 0:  # ZeRO keeps reduced gradients in its own partitions
                record["grads"] = full_state(trainer.model, trainer.groups, lambda p: p.grad)
                record["grad_square_sums"] = grad_square_sums(trainer.model, trainer.groups)
        original_step()

    trainer.engine.step = step_and_capture
    for _ in range(STEPS):
        losses, grad_norm = trainer.train_step()
        record["loss"].append(mean_over_ranks(losses))
        record["grad_norm"].append(grad_norm)
    record["params"] = full_state(trainer.model, trainer.groups)
    record["thresholds"] = [gather_ranks(layer.thresholds.float()) for layer in trainer.model.moe_layers()]
    record["capacity"] = gather_ranks(torch.tensor(capacity_stats(trainer.model)[1]))
    if case.get("consolidation"):
        trainer.save_checkpoint()
        record["checkpoint"] = str(config.checkpoint_dir / f"step_{trainer.step:08d}")
        record["gathered"] = gathered_state(trainer)
    ema_model = trainer.filled_ema_model()
    record["ema"] = full_state(ema_model, trainer.groups)  # the EMA is sharded as the masters: put back whole
    if case.get("sampling", True):
        record["samples"], record["sample_c_avg"] = sample(ema_model, trainer, config)
    if case.get("checkpoint_dir"):
        record["checkpoint_files_dir"] = case["checkpoint_dir"]
        record["checkpoint_files"] = save_and_reload(trainer, case["checkpoint_dir"])
    return record


def forget_deepspeed_expert_groups():
    """DeepSpeed keeps the expert and expert-data-parallel groups of the process by name ("ep_size_N"), so a
    case would reuse those of an earlier case of the same EP size but another layout (DP=2 against TP=2),
    and name files after the largest EP size seen. A training process has one layout; each case here too."""
    for registry in (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
                     ds_groups._EXPERT_DATA_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        registry.clear()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("cases", type=Path)
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    DiT._init_weights = init_away_from_zero
    runtime = init_runtime()
    for case in json.loads(args.cases.read_text()):
        forget_deepspeed_expert_groups()
        compile_module.OPTIONS = {"backend": case.get("compile_backend", "inductor")}
        config = load_config(args.config, [*case["overrides"], f"train.out_dir={args.out_dir / case['name']}"])
        trainer = Trainer(config, runtime)
        record = run_case(trainer, config, case)
        if runtime.is_main:
            torch.save(record, args.out_dir / f"{case['name']}.pt")
        del trainer
        gc.collect()
    shutdown_runtime()
    exit_process(0)


if __name__ == "__main__":
    main()
