"""What a resume may change (training maths refused unless allowed, model-defining keys never, the rest applied),
the tokens per training pool under every layout, what the data sampler notices, and which run a resumed run is
(the same W&B run in its own directory, a branch with a new id from another run's checkpoint)."""
import json
from pathlib import Path

import pytest

from diffmoe_scale.config import ConfigError, load_config
from diffmoe_scale.data import ShuffledBatchSampler
from diffmoe_scale.train.checkpoint import MANIFEST
from diffmoe_scale.train.resume_policy import (DEFINING, KEY_CLASSES, MATHS, OPERATIONAL, ResumeRule,
                                               allowable_changes, check_allowable, classify_changes, config_keys,
                                               describe_pool, key_class, pool_tokens)
from diffmoe_scale.train.run_identity import resumed_identity

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "digits_diffmoe_e4_flow.yaml"
ONE = {"world_size": 1, "tp": 1, "ep": 1, "zero_stage": 0, "precision": "fp32"}


def config(*overrides: str) -> dict:
    return load_config(DIGITS, ["train.global_batch_size=32", *overrides]).to_dict()


def layout(world_size: int, tp: int = 1, ep: int = 1) -> dict:
    return {**ONE, "world_size": world_size, "tp": tp, "ep": ep}


def test_every_key_has_a_class_of_its_own_or_of_its_section():
    unclassified = [key for key in config_keys() if key not in KEY_CLASSES and key.split(".")[0] + ".*" not in KEY_CLASSES]
    assert not unclassified
    assert {key_class(key) for key in config_keys()} == {DEFINING, MATHS, OPERATIONAL}
    # The list of training maths, and what must stay free.
    for key in ("moe.capacity", "moe.pool", "moe.threshold_ema", "moe.predictor_loss_weight", "diffusion.beta_end",
                "train.global_batch_size", "train.seed", "train.grad_accum_steps"):
        assert key_class(key) == MATHS, key
    for key in ("optim.lr", "optim.warmup_steps", "optim.grad_clip", "train.max_steps", "train.precision",
                "train.tf32", "train.deterministic", "parallel.ep", "parallel.timeout_minutes", "logging.every_steps",
                "checkpoint.keep_last"):
        assert key_class(key) == OPERATIONAL, key


def test_the_docs_list_every_change_a_resume_refuses():
    text = (REPO / "docs" / "long-runs.md").read_text()
    section = text.split("## Config changes on resume")[1].split("\n## ")[0]
    missing = [name for name in allowable_changes() if f"`{name}`" not in section]
    assert not missing, f"docs/long-runs.md does not name {missing}"


def test_changes_fall_into_their_classes():
    saved = config()
    current = config("model.depth=4", "model.class_dropout=0.2", "moe.capacity=2.0", "moe.top_k=1", "optim.lr=0.5",
                     "train.seed=3", "diffusion.beta_end=0.03")
    changes = classify_changes(saved, current, allow={"train.seed"}, derived={"pool_tokens": (512, 256)})
    assert changes.defining == ["model.depth: 6 -> 4"]
    assert changes.refused == ["model.class_dropout: 0.1 -> 0.2", "moe.capacity: 1.0 -> 2.0", "pool_tokens: 512 -> 256"]
    assert changes.allowed == ["train.seed: 0 -> 3"]
    # top_k (token choice) and the DDPM schedule are unused by a DiffMoE flow run: no change to its maths.
    assert changes.operational == ["diffusion.beta_end: 0.02 -> 0.03", "moe.top_k: 2 -> 1", "optim.lr: 0.001 -> 0.5"]
    ddpm = classify_changes(config("diffusion.objective=ddpm", "sample.sampler=ancestral"),
                            config("diffusion.objective=ddpm", "sample.sampler=ancestral", "diffusion.beta_end=0.03"),
                            allow=set())
    assert ddpm.refused == ["diffusion.beta_end: 0.02 -> 0.03"]


def test_pool_tokens_under_each_layout_and_pool():
    digits = config()  # 8x8 images, patch 2: 16 tokens each; global batch 32
    assert pool_tokens(digits, ONE) == 32 * 16
    assert pool_tokens(digits, layout(2, ep=2)) == 32 * 16  # the EP group's batch is the global batch
    assert pool_tokens(digits, layout(2, tp=2)) == 32 * 16  # TP ranks share their data
    assert pool_tokens(digits, layout(4, ep=2)) == 16 * 16  # two EP groups, each its own pool
    assert pool_tokens(config("train.grad_accum_steps=2"), ONE) == 16 * 16  # each micro-batch its own pool
    assert pool_tokens(config("moe.pool=local"), layout(2, ep=2)) == 16 * 16
    assert pool_tokens(config("moe.ffn=expert_choice"), layout(2, ep=2)) == 16
    assert pool_tokens(config("moe.ffn=dense"), ONE) is None
    assert pool_tokens(config("moe.ffn=token_choice"), ONE) is None
    assert pool_tokens(config("moe.ffn=token_choice", "moe.capacity_factor=1.25"), layout(2)) == 16 * 16
    assert describe_pool(digits, layout(4, ep=2)) == "token pool 256 tokens (ep_group: 16 images x 16 tokens)"
    assert describe_pool(config("moe.ffn=dense"), ONE) == "no token pool"


def manifest_for(saved_config: dict, saved_layout: dict) -> dict:
    return {"kind": "consolidated", "step": 8, "run_id": "abc", "layout": saved_layout, "config": saved_config}


def test_a_layout_that_changes_the_pool_is_refused_unless_allowed(capsys):
    # Two data-parallel ranks without EP (two pools of 16 images) resumed on one process (one of 32).
    manifest = manifest_for(config(), layout(2))
    with pytest.raises(ConfigError) as refused:
        ResumeRule().check_config(Path("ckpt"), manifest, config("optim.lr=0.5"), ONE)
    assert str(refused.value) == ("checkpoint ckpt was trained with other training maths: pool_tokens: 256 -> 512. "
                                  "Resume with its values, or accept the change with --allow-change pool_tokens")
    ResumeRule(["pool_tokens"]).check_config(Path("ckpt"), manifest, config("optim.lr=0.5"), ONE)
    assert capsys.readouterr().out.splitlines() == [
        "resuming with changed training maths, allowed by --allow-change: pool_tokens: 256 -> 512",
        "resuming with a changed config: optim.lr: 0.001 -> 0.5"]
    # The same pool in another layout is no change: EP over both ranks -> one process.
    ResumeRule().check_config(Path("ckpt"), manifest_for(config(), layout(2, ep=2)), config(), ONE)
    with pytest.raises(ConfigError, match=r"holds another model; it cannot continue with model.depth: 6 -> 4"):
        ResumeRule(["moe.capacity"]).check_config(Path("ckpt"), manifest, config("model.depth=4"), layout(2))


def test_allow_change_names_are_checked():
    check_allowable(["moe.capacity", "pool_tokens", "dataset_size"])
    for name in ("optim.lr", "model.depth", "capacity"):
        with pytest.raises(ConfigError, match=rf"--allow-change {name}: not a change that a resume refuses"):
            check_allowable([name])


def test_the_sampler_notices_another_seed_batch_or_dataset_size(capsys):
    saved = ShuffledBatchSampler(1797, 32, seed=0)
    saved.next_indices()
    state = saved.state_dict()
    assert state == {"step": 1, "seed": 0, "global_batch_size": 32, "dataset_size": 1797}
    same = ShuffledBatchSampler(1797, 32, seed=0)
    assert same.load_state_dict(state) == {} and same.step == 1
    assert torch_equal(same.next_indices(), saved.next_indices())
    other = ShuffledBatchSampler(1500, 64, seed=0)
    differences = other.load_state_dict(state)
    assert differences == {"global_batch_size": (32, 64), "dataset_size": (1797, 1500)}
    rule = ResumeRule()
    rule.check_config(Path("ckpt"), manifest_for(config(), ONE), config(), ONE)
    with pytest.raises(ConfigError) as refused:
        rule.check_data({"dataset_size": (1797, 1500)})
    assert str(refused.value) == ("checkpoint ckpt drew its batches from other data: dataset_size: 1797 -> 1500. "
                                  "Resume with its values, or accept the change with --allow-change dataset_size")
    # A change the config check judged already is not judged twice.
    allowing = ResumeRule(["train.global_batch_size", "pool_tokens", "dataset_size"])
    allowing.check_config(Path("ckpt"), manifest_for(config(), ONE), config("train.global_batch_size=64"), ONE)
    allowing.check_data(differences)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == "resuming with changed training maths, allowed by --allow-change: dataset_size: 1797 -> 1500"
    # A state written before the dataset size was recorded cannot tell it.
    assert ShuffledBatchSampler(1500, 32, seed=0).load_state_dict({"step": 1, "seed": 0, "global_batch_size": 32}) == {}


def torch_equal(a, b) -> bool:
    return all(x.equal(y) for x, y in zip(a, b))


def test_a_resume_in_its_own_directory_is_the_same_run_and_elsewhere_a_branch(tmp_path):
    own = tmp_path / "a" / "checkpoints"
    checkpoint = own / "step_00000008"
    checkpoint.mkdir(parents=True)
    manifest = {"run_id": "first", "step": 8}
    assert resumed_identity(checkpoint, manifest, own, "fresh") == ("first", None)
    assert resumed_identity(tmp_path / "a" / "checkpoints" / ".." / "checkpoints" / checkpoint.name, manifest, own,
                            "fresh") == ("first", None)
    branch = {"run_id": "first", "checkpoint": str(checkpoint), "step": 8}
    assert resumed_identity(checkpoint, manifest, tmp_path / "b" / "checkpoints", "fresh") == ("fresh", branch)
    # A branch resumed in its own directory stays that branch.
    assert resumed_identity(checkpoint, {**manifest, "branched_from": branch}, own, "x") == ("first", branch)


# ----------------------------------------------------------------------------------------------
# In one process, real trainers: a branch gets its own W&B run; the sampler's state notices a changed dataset


def trainer(runtime, out_dir: Path, *overrides: str):
    from diffmoe_scale.train.trainer import Trainer

    return Trainer(load_config(DIGITS, [
        "train.global_batch_size=32", "sample.steps=2", "sample.per_class=1", "model.depth=2", "logging.every_steps=2",
        "checkpoint.every_steps=0", f"train.out_dir={out_dir}", *overrides]), runtime)


def wandb_runs(out_dir: Path) -> list[tuple[str, dict]]:
    """(run id, config) of each start of a W&B run under out_dir, oldest first."""
    from tests.helpers import wandb_records

    found = []
    for run_dir in sorted((out_dir / "wandb").glob("offline-run-*")):
        run_file = next(run_dir.glob("run-*.wandb"))  # run-<id>.wandb; the directory may carry a suffix
        records = wandb_records(run_file)
        config = {item.key: json.loads(item.value_json) for r in records if r.HasField("run")
                  for item in r.run.config.update}
        found.append((run_file.stem.removeprefix("run-"), config))
    return found


@pytest.mark.slow
def test_resume_path_into_a_new_directory_starts_a_branch_with_its_own_wandb_run(runtime, tmp_path):
    source, branch = tmp_path / "source", tmp_path / "branch"
    wandb = ("logging.wandb=true",)
    assert trainer(runtime, source, "train.max_steps=4", *wandb).train() == 0
    source_id = json.loads((source / "checkpoints" / "step_00000004" / MANIFEST).read_text())["run_id"]
    assert trainer(runtime, branch, "train.max_steps=6", *wandb).train(str(source / "checkpoints")) == 0
    assert trainer(runtime, branch, "train.max_steps=8", *wandb).train() == 0  # the branch continues itself
    assert trainer(runtime, source, "train.max_steps=6", *wandb).train() == 0  # and the source itself

    lineage = {"run_id": source_id, "checkpoint": str((source / "checkpoints" / "step_00000004").resolve()), "step": 4}
    manifests = [json.loads((branch / "checkpoints" / f"step_{s:08d}" / MANIFEST).read_text()) for s in (6, 8)]
    branch_id = manifests[0]["run_id"]
    assert branch_id != source_id
    assert [(m["run_id"], m["branched_from"]) for m in manifests] == [(branch_id, lineage)] * 2
    source_manifest = json.loads((source / "checkpoints" / "step_00000006" / MANIFEST).read_text())
    assert (source_manifest["run_id"], source_manifest["branched_from"]) == (source_id, None)

    assert [run_id for run_id, _ in wandb_runs(source)] == [source_id, source_id]
    branch_runs = wandb_runs(branch)
    assert [run_id for run_id, _ in branch_runs] == [branch_id, branch_id]
    assert all(config["branched_from"] == lineage for _, config in branch_runs)
    assert all("branched_from" not in config for _, config in wandb_runs(source))
    assert [r["step"] for r in map(json.loads, (branch / "metrics.jsonl").read_text().splitlines())] == [6, 8]


@pytest.mark.slow
def test_a_resume_onto_a_dataset_of_another_size_is_refused_unless_allowed(runtime, tmp_path):
    assert trainer(runtime, tmp_path, "train.max_steps=2").train() == 0
    # The same digits, sampled as though the dataset had 1500 images (as another latents directory would).
    resumed = trainer(runtime, tmp_path, "train.max_steps=3")
    resumed.sampler = ShuffledBatchSampler(1500, 32, seed=0)
    with pytest.raises(ConfigError, match=r"drew its batches from other data: dataset_size: 1797 -> 1500"):
        resumed.resume("auto")
    allowed = trainer(runtime, tmp_path, "train.max_steps=3")
    allowed.sampler = ShuffledBatchSampler(1500, 32, seed=0)
    allowed.resume("auto", ("dataset_size",))
    assert allowed.step == 2 and allowed.sampler.step == 2
