"""Scale-out equivalence on real processes (gloo on CPU): every parallel layout trains exactly as
one process does, and every launcher starts the same training.

The cases run in `tests/distributed/equivalence_worker.py` (the real trainer and DeepSpeed engine), one
launch per world size: every case of that size runs in the same torchrun ranks, one after the other,
each on its own trainer. Each compares its per-step losses, first-step routing and gradients, and final
parameters, EMA and thresholds with a single-process reference on the same global batch.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffmoe_scale.parallel.runtime import use_this_environments_ninja
from diffmoe_scale.train.checkpoint import MANIFEST, read_consolidated
from diffmoe_scale.train.consolidation import write_consolidated
from tests.helpers import clean_env, read_metrics

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CONFIG = "configs/digits_diffmoe_e4_flow.yaml"
COMMON = ["train.global_batch_size=32", "logging.every_steps=1", "sample.steps=4"]  # 4 sampling steps show what 50 would
RTOL = 1e-5  # fp32: one process and P ranks differ only in the order of float sums
EP2 = ["parallel.ep=2"]

# name -> (overrides, options); "consolidation": also compare the checkpoint's files with the gathered state.
ONE_RANK = {
    "reference": ([], {}),  # the whole batch as one pool
    "two_pools": (["train.grad_accum_steps=2"], {}),  # two micro-batches: two pools, as two data-parallel EP groups
    "expert_choice": (["moe.ffn=expert_choice", "moe.pool=sample"], {}),
}
TWO_RANKS = {
    "ep2": (EP2, {"consolidation": True, "checkpoint_dir": "deepspeed_checkpoint"}),
    "dp2": ([], {}),
    "local_pool_ep2": ([*EP2, "moe.pool=local"], {}),
    "expert_choice_ep2": ([*EP2, "moe.ffn=expert_choice", "moe.pool=sample"], {}),
    "zero1": ([*EP2, "parallel.zero_stage=1"], {"consolidation": True}),
    "zero2": ([*EP2, "parallel.zero_stage=2"], {"consolidation": True}),
    "checkpointing": ([*EP2, "parallel.activation_checkpointing=true"], {}),
    # Compiled blocks (torch.compile's aot_eager backend: capture and autograd, no code generation) with
    # checkpointing, through the trainer and the engine. On one process, without the trainer, and sampling
    # (its graphs take as long to compile as training's): tests/test_compile.py.
    "compiled_ep2": ([*EP2, "train.compile=true", "parallel.activation_checkpointing=true"],
                     {"compile_backend": "aot_eager", "sampling": False}),
    "bf16": ([*EP2, "parallel.zero_stage=1", "train.precision=bf16"], {"consolidation": True}),
    "tp2": (["parallel.tp=2"], {"consolidation": True}),  # last: megatron-core's groups stay
}
FOUR_RANKS = {
    "dp4_ep2": (EP2, {"consolidation": True}),
    "ep4": (["parallel.ep=4"], {}),
    "tp2_ep2_zero1": (["parallel.tp=2", *EP2, "parallel.zero_stage=1"], {"consolidation": True}),  # last
}

pytestmark = pytest.mark.slow


def run_checked(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{output}"
    return result


def run_cases(out_dir: Path, nproc: int, cases: dict) -> dict[str, dict]:
    """Every case in one launch of `nproc` ranks; name -> its record."""
    specs = [{"name": name, "overrides": [*COMMON, *overrides], **options} for name, (overrides, options) in cases.items()]
    for spec in specs:
        if "checkpoint_dir" in spec:
            spec["checkpoint_dir"] = str(out_dir / spec["checkpoint_dir"])
    (out_dir / "cases.json").write_text(json.dumps(specs))
    args = ["tests/distributed/equivalence_worker.py", str(out_dir), str(out_dir / "cases.json"), "--config", CONFIG]
    launcher = [sys.executable] if nproc == 1 else [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node",
                                                    str(nproc)]
    run_checked([*launcher, *args])
    return {name: torch.load(out_dir / f"{name}.pt", weights_only=False) for name in cases}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return run_cases(tmp_path_factory.mktemp("one_rank"), 1, ONE_RANK)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_cases(tmp_path_factory.mktemp("two_ranks"), 2, TWO_RANKS)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return run_cases(tmp_path_factory.mktemp("four_ranks"), 4, FOUR_RANKS)


def assert_close_tensors(ours: dict, ref: dict, what: str, rtol: float = RTOL, atol: float = 0.0):
    """Each tensor within rtol of the reference tensor's largest entry (plus atol)."""
    assert ours.keys() == ref.keys(), what
    for name in ref:
        scale = ref[name].abs().max().item()
        error = (ours[name] - ref[name]).abs().max().item()
        assert error <= rtol * scale + atol, f"{what} {name}: max error {error:.3g} vs scale {scale:.3g}"


def assert_consolidates_as_gathered(record: dict):
    """The checkpoint's files, read in one process (launch/checkpoint.py consolidate), give exactly the whole
    state the ranks gathered through the engine at the same step."""
    checkpoint = Path(record["checkpoint"])
    out = checkpoint.with_name(checkpoint.name + "_consolidated")
    out.mkdir()
    write_consolidated(checkpoint, json.loads((checkpoint / MANIFEST).read_text()), out)
    ours, gathered = read_consolidated(out), record["gathered"]
    assert ours["adam_step"] == gathered["adam_step"] and ours["trainer"].keys() == gathered["trainer"].keys()
    for kind in ("params", "buffers", "ema"):
        assert ours[kind].keys() == gathered[kind].keys(), kind
        different = [name for name in gathered[kind] if not torch.equal(ours[kind][name], gathered[kind][name].float())]
        assert not different, f"{kind}: {different[:5]}"
    for name, moments in gathered["moments"].items():
        for key, tensor in moments.items():
            assert torch.equal(ours["moments"][name][key], tensor), f"{key} of {name}"


def assert_same_training(ours: dict, ref: dict, *, routing=True, grads=True, sampling=True):
    if "checkpoint" in ours:
        assert_consolidates_as_gathered(ours)
    for step, (loss, ref_loss) in enumerate(zip(ours["loss"], ref["loss"]), 1):
        for name in ref_loss:
            assert loss[name] == pytest.approx(ref_loss[name], rel=RTOL), f"step {step} {name} loss"
    assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL)
    if routing:
        for layer, (mask, ref_mask) in enumerate(zip(ours["masks"], ref["masks"])):
            assert torch.equal(mask, ref_mask), f"MoE layer {layer}: routing differs"
    if grads:
        assert_close_tensors(ours["grads"], ref["grads"], "gradient after step 1")
        # The norm the trainer clips with counts every shard once: check each part on the whole model.
        is_expert = {name: ".experts." in name for name in ours["grads"]}
        for kind, expected in (("expert", [g for n, g in ours["grads"].items() if is_expert[n]]),
                               ("dense", [g for n, g in ours["grads"].items() if not is_expert[n]])):
            ours_sum = ours["grad_square_sums"]["expert"] if kind == "expert" else (
                ours["grad_square_sums"]["replicated"] + ours["grad_square_sums"]["tensor_parallel"])
            whole_model_sum = sum(g.double().pow(2).sum().item() for g in expected)
            assert ours_sum.item() == pytest.approx(whole_model_sum, rel=RTOL), kind
    # Adam turns float noise in near-zero gradients into steps of up to lr: allow 1e-6 absolute.
    assert_close_tensors(ours["params"], ref["params"], f"parameters after {len(ref['loss'])} steps", atol=1e-6)
    assert_close_tensors(ours["ema"], ref["ema"], f"EMA after {len(ref['loss'])} steps", atol=1e-6)
    for layer, (taus, ref_taus) in enumerate(zip(ours["thresholds"], ref["thresholds"])):
        assert (taus == taus[0]).all(), f"MoE layer {layer}: thresholds differ between ranks"
        torch.testing.assert_close(taus[0], ref_taus[0], rtol=RTOL, atol=1e-7)
    assert (ours["capacity"] == ours["capacity"][0]).all(), "capacity statistics differ between ranks"
    if routing:
        torch.testing.assert_close(ours["capacity"][0], ref["capacity"][0], rtol=0, atol=0)
    if routing and sampling:
        # Sampling with sharded experts: threshold routing with per-expert counts (C_avg ~ 1.9 here).
        assert ours["sample_c_avg"] == pytest.approx(ref["sample_c_avg"], rel=RTOL) and ref["sample_c_avg"] < 3.5
        torch.testing.assert_close(ours["samples"], ref["samples"], rtol=1e-4, atol=1e-4)


def test_ep2_equals_one_process(one_rank, two_ranks):
    assert_same_training(two_ranks["ep2"], one_rank["reference"])


def test_ep4_on_four_ranks_equals_one_process(one_rank, four_ranks):
    assert_same_training(four_ranks["ep4"], one_rank["reference"])


def test_dp2_ep1_equals_one_process_with_two_pools(one_rank, two_ranks):
    assert_same_training(two_ranks["dp2"], one_rank["two_pools"], routing=False)


def test_dp4_ep2_equals_one_process_with_two_pools(one_rank, four_ranks):
    assert_same_training(four_ranks["dp4_ep2"], one_rank["two_pools"], routing=False)


def test_local_pool_with_ep2_keeps_each_rank_batch_as_its_pool(one_rank, two_ranks):
    # moe.pool=local (the authors' DDP semantics) with sharded experts: two pools, one per rank.
    assert_same_training(two_ranks["local_pool_ep2"], one_rank["two_pools"], routing=False)


def test_expert_choice_baseline_with_ep2(one_rank, two_ranks):
    # EC-DiT: each sample is its own pool whatever the layout.
    assert_same_training(two_ranks["expert_choice_ep2"], one_rank["expert_choice"])


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_match_stage_0(one_rank, two_ranks, stage):
    # ZeRO keeps reduced gradients in its own partitions: compare losses, norms and parameters.
    assert_same_training(two_ranks[f"zero{stage}"], one_rank["reference"], grads=False)


def test_activation_checkpointing_matches_plain_backward(one_rank, two_ranks):
    # Same routing, same gradients, thresholds updated once per step (not again by the recompute).
    assert_same_training(two_ranks["checkpointing"], one_rank["reference"])


def test_compiled_blocks_train_as_eager(one_rank, two_ranks):
    # EP=2 (its MoE FFNs eager inside the compiled blocks) with checkpointing.
    assert_same_training(two_ranks["compiled_ep2"], one_rank["reference"], sampling=False)


def test_tp2_equals_tp1(one_rank, two_ranks):
    assert_same_training(two_ranks["tp2"], one_rank["reference"])


def test_tp2_with_ep2_and_zero1(one_rank, four_ranks):
    assert_same_training(four_ranks["tp2_ep2_zero1"], one_rank["reference"], grads=False)


@pytest.mark.parametrize("checkpointing,passes", [(False, 2), (True, 3)], ids=["plain", "checkpointed"])
def test_all_to_all_moves_exactly_the_routed_tokens(one_rank, two_ranks, checkpointing, passes):
    """Rows each rank sends to each peer in step 1 (out and back) equal the count derived from the
    routing mask: each (token, expert) pair once per direction and pass, no padding to capacity.
    The passes: forward and backward, plus the recomputed forward under activation checkpointing."""
    ranks = 2
    ours = two_ranks["checkpointing" if checkpointing else "ep2"]
    experts_per_rank = 4 // ranks
    for layer, (mask, sent) in enumerate(zip(one_rank["reference"]["masks"], ours["rows_sent"])):
        tokens_per_rank = len(mask) // ranks
        owner = torch.arange(len(mask)) // tokens_per_rank
        holder = torch.arange(mask.shape[1]) // experts_per_rank
        pairs = torch.zeros(ranks, ranks, dtype=torch.long)  # [token's rank, expert's rank]
        for token, expert in mask.nonzero().tolist():
            pairs[owner[token], holder[expert]] += 1
        expected = passes * (pairs + pairs.T)  # tokens out to the expert's rank, results back to the token's rank
        assert torch.equal(sent, expected), f"MoE layer {layer}: sent {sent.tolist()}, expected {expected.tolist()}"
        assert sent.sum() == 2 * passes * mask.sum()


def test_deepspeed_checkpoint_writes_one_file_per_expert(two_ranks):
    """DeepSpeed knows the experts: its checkpoint of an EP=2 run files each expert of each MoE layer
    separately (under its global id), keeps them out of the model file, and loads back exactly."""
    ours = two_ranks["ep2"]
    checkpoint = Path(ours["checkpoint_files_dir"])
    expert_files = {f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"
                    for layer in range(3) for expert in range(4)}
    assert expert_files <= set(ours["checkpoint_files"])
    model_file = torch.load(checkpoint / "step3" / "mp_rank_00_model_states.pt", weights_only=False)
    assert not [key for key in model_file["module"] if "expert" in key]
    # Layer 1 is the second MoE layer (block 3); expert 3 lives on EP rank 1.
    expert_state = torch.load(checkpoint / "step3" / "layer_1_expert_3_mp_rank_00_model_states.pt")
    w1 = expert_state["blocks.3.ffn.deepspeed_moe.experts.deepspeed_experts.3.w1"]
    assert torch.equal(w1, ours["params"]["blocks.3.ffn.deepspeed_moe.experts.w1"][3])


def test_bf16_tracks_fp32(one_rank, two_ranks):
    for loss, ref_loss in zip(two_ranks["bf16"]["loss"], one_rank["reference"]["loss"]):
        assert loss["diffusion"] == pytest.approx(ref_loss["diffusion"], rel=0.02)
    assert_consolidates_as_gathered(two_ranks["bf16"])


def test_fp16_on_cpu_is_refused_clearly(tmp_path):
    result = subprocess.run([sys.executable, "pretrain_diffmoe.py", "--config", CONFIG, "--set", "train.precision=fp16",
                             "--set", "parallel.zero_stage=1", "--set", f"train.out_dir={tmp_path}"], cwd=REPO, env=clean_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert "train.precision: fp16 needs an accelerator with fp16 support" in result.stderr


# --------------------------------------------------------------------------------------------
# Launchers: the one entry point, EP=2 over two processes, the same losses under each.

LAUNCHED = ["parallel.ep=2", "train.max_steps=4", "logging.every_steps=2", "sample.steps=2", "sample.per_class=1"]
TRAIN = ["pretrain_diffmoe.py", "--config", CONFIG, *[arg for override in LAUNCHED for arg in ("--set", override)]]


def launch(launcher: str, out_dir: Path) -> list[str]:
    train = [*TRAIN, "--set", f"train.out_dir={out_dir}"]
    if launcher == "deepspeed":
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29517", *train]
    return [str(VENV_BIN / "mpirun"), "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, *train]


def final_loss(out_dir: Path) -> float:
    return read_metrics(out_dir)[-1]["loss"]


@pytest.fixture(scope="module")
def single_process_loss(runtime, tmp_path_factory):
    from diffmoe_scale.config import load_config
    from diffmoe_scale.train.trainer import Trainer

    out_dir = tmp_path_factory.mktemp("single")
    config = load_config(REPO / CONFIG, [*LAUNCHED, "parallel.ep=1", f"train.out_dir={out_dir}"])
    assert Trainer(config, runtime).train() == 0
    return final_loss(out_dir)


# torchrun starts EP=2 training in other test files: it continues a one-process checkpoint with the one-process
# run's losses (EP=2, ZeRO 2: test_checkpoint.py), and srun's run equals torchrun's bit for bit (test_slurm.py).
@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
def test_launcher_runs_ep2_training(launcher, single_process_loss, tmp_path):
    env_path = f"{VENV_BIN}:{os.environ['PATH']}"  # the deepspeed launcher starts `python` from PATH
    os.environ["PATH"], saved = env_path, os.environ["PATH"]
    try:
        result = run_checked(launch(launcher, tmp_path))
    finally:
        os.environ["PATH"] = saved
    expected_launcher = {"deepspeed": "env", "mpirun": "mpirun"}[launcher]
    assert f"2 ranks ({expected_launcher}): dp 2 x tp 1, ep 2" in result.stdout
    assert (tmp_path / "samples.png").is_file()
    assert final_loss(tmp_path) == pytest.approx(single_process_loss, rel=RTOL)


def test_every_launcher_builds_deepspeed_ops_with_the_environments_ninja(monkeypatch):
    """A process started without the environment's bin on PATH (plain `.venv/bin/python`, srun, mpirun)
    must build DeepSpeed's ops with the same ninja as one the deepspeed launcher starts (it puts the bin
    first); two ninja versions would rebuild the ops for each other."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_this_environments_ninja()
    assert shutil.which("ninja") == str(VENV_BIN / "ninja")
    assert os.environ["PATH"].split(os.pathsep)[1:] == ["/usr/bin", "/bin"]
