"""The code on its real target, checked without one: every op and collective of training, checkpointing,
consolidation and sampling follows the rules a GPU and NCCL enforce, and GPU-written checkpoints serve a
CPU-only machine and the other way round (pretend CUDA: tests/pretend_cuda.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from diffmoe_scale.config import load_config
from diffmoe_scale.parallel import collectives
from diffmoe_scale.parallel.runtime import cuda_device_index
from tests.helpers import NARROW, clean_env, launch_tool, read_metrics
from tests.pretend_cuda import CUDA, DeviceMismatch, OnCuda, pretend_cuda

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
CONFIG = "configs/digits_diffmoe_e4_flow.yaml"
TINY = ["train.global_batch_size=16", "logging.every_steps=1", "sample.steps=2", "sample.per_class=1", *NARROW]


# --------------------------------------------------------------------------------------------
# The harness refuses what CUDA refuses (so the runs below passing means something).


def test_pretend_cuda_refuses_device_mixes_and_cpu_collectives(runtime):
    with pretend_cuda():
        on_gpu = torch.randn(4, 4, device="cuda")
        assert isinstance(on_gpu, OnCuda) and on_gpu.device == CUDA
        assert isinstance(torch.zeros(4).to("cuda") @ on_gpu, OnCuda)
        assert (on_gpu * torch.tensor(2.0)).device == CUDA  # a cpu scalar is fine, as in torch
        with pytest.raises(DeviceMismatch, match="cuda and cpu tensors mixed"):
            on_gpu @ torch.randn(4, 4)
        with pytest.raises(DeviceMismatch, match="cuda and cpu tensors mixed"):
            on_gpu.index_select(0, torch.tensor([0, 1]))
        with pytest.raises(DeviceMismatch, match="a cpu generator for a cuda tensor"):
            torch.randn(3, device="cuda", generator=torch.Generator())
        torch.randn(3, device="cuda", generator=torch.Generator(device="cuda"))
        dist.all_reduce(torch.ones(2, device="cuda"))
        with pytest.raises(DeviceMismatch, match="NCCL takes CUDA tensors only"):
            dist.all_reduce(torch.ones(2))
        assert torch.equal(on_gpu.cpu(), on_gpu.host) and type(on_gpu.cpu()) is torch.Tensor


def test_pretend_cuda_counts_host_reads(runtime):
    with pretend_cuda() as mode:
        values = torch.arange(6, device="cuda")
        values.sum().item()
        values.tolist()
        values[values > 2].sum()  # boolean-mask indexing waits for the count
    assert mode.host_syncs == {"_local_scalar_dense.default": 1, "tolist": 1, "index.Tensor": 1}


def test_what_pretend_cuda_saves_loads_on_a_cpu_only_machine_only_with_map_location(runtime, tmp_path):
    with pretend_cuda():
        torch.save({"weight": torch.full((3,), 2.0, device="cuda"), "step": 7}, tmp_path / "state.pt")
    with pytest.raises(RuntimeError, match="on a CUDA device but torch.cuda.is_available\\(\\) is False"):
        torch.load(tmp_path / "state.pt", weights_only=False)
    loaded = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=False)
    assert torch.equal(loaded["weight"], torch.full((3,), 2.0)) and loaded["step"] == 7


# --------------------------------------------------------------------------------------------
# Units


def test_the_stop_agreement_hands_nccl_a_cuda_tensor(runtime, monkeypatch):
    monkeypatch.setattr(collectives, "_distributed", lambda: True)  # a world of one still runs the collective
    with pretend_cuda():
        assert collectives.max_over_ranks(75, CUDA) == 75


@pytest.mark.parametrize("local_rank,visible,ranks_on_node,expected", [
    (3, 8, 8, 3),  # torchrun / deepspeed: every rank sees the node's GPUs
    (3, 1, 8, 0),  # srun --gpus-per-task=1 / GPU binding: each rank sees its own GPU as device 0
    (1, 1, 2, 0),  # two ranks sharing one GPU (the GPU smoke suite)
])
def test_each_rank_takes_its_own_gpu_under_every_binding(local_rank, visible, ranks_on_node, expected):
    assert cuda_device_index(local_rank, visible, ranks_on_node) == expected


def test_a_gpu_binding_that_fits_no_rule_is_an_error_naming_it():
    with pytest.raises(RuntimeError, match="local rank 3 of 4 on this node sees 2 GPUs"):
        cuda_device_index(3, 2, 4)


# --------------------------------------------------------------------------------------------
# End to end: the real trainer and DeepSpeed engine on two pretend GPUs.


def run(command: list[str], timeout: int = 600) -> str:
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{output[-6000:]}"
    return output


def train_command(out_dir: Path, *overrides: str, gpu: bool, result: Path | None = None) -> list:
    """Two ranks under torchrun, on the CPU or (`gpu`) on pretend GPUs."""
    script = ["tests/distributed/pretend_cuda_worker.py", str(result)] if gpu else ["pretrain_diffmoe.py"]
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *script, "--config", CONFIG]
    for override in (*TINY, f"train.out_dir={out_dir}", *overrides):
        command += ["--set", override]
    return command


def assert_reductions_in_fp32(collective_dtypes: dict) -> None:
    """Data-parallel bf16 training (no TP, whose activation all-reduces are bf16 as in Megatron) sums no
    bf16 tensor across ranks: gradients are reduced in fp32. bf16 travels only where nothing is summed
    (ZeRO's parameter all-gather, the MoE all-to-all)."""
    reductions = {name: dtypes for name, dtypes in collective_dtypes.items() if "reduce" in name}
    assert reductions and not any("torch.bfloat16" in dtypes for dtypes in reductions.values()), collective_dtypes
    assert "torch.bfloat16" in collective_dtypes["_allgather_base_"] + collective_dtypes["alltoall_base_"]


@pytest.mark.slow
def test_gpu_run_continues_a_cpu_checkpoint_and_its_checkpoint_serves_a_cpu_only_machine(runtime, tmp_path, capsys):
    """EP=2, ZeRO 1, bf16: CPU ranks write step 2; pretend-GPU ranks resume it (CPU -> GPU), train to step 4,
    save, sample and gather the consolidated state; then this CPU-only process consolidates the GPU-written
    checkpoint, exports its EMA and resumes it on one process (GPU -> CPU, resharded)."""
    run_dir, layout = tmp_path / "run", ["parallel.ep=2", "parallel.zero_stage=1", "train.precision=bf16"]
    run(train_command(run_dir, *layout, "train.max_steps=2", gpu=False))
    result = tmp_path / "gpu.json"
    output = run(train_command(run_dir, *layout, "train.max_steps=4", gpu=True, result=result))
    assert f"resumed from {run_dir}/checkpoints/step_00000002 at step 2" in output
    gpu = json.loads(result.read_text())
    assert gpu["exit_code"] == 0 and gpu["device"] == "cuda:0"
    assert_reductions_in_fp32(gpu["collective_dtypes"])
    gpu_checkpoint = run_dir / "checkpoints" / "step_00000004"
    with pytest.raises(RuntimeError, match="on a CUDA device"):  # written as a GPU writes it
        torch.load(gpu_checkpoint / "trainer_rank_00000.pt", weights_only=False)

    # safetensors keep no device: what sampling reads from the export is what any export holds (test_sample.py).
    launch_tool("checkpoint", "export-ema", str(gpu_checkpoint), "--out", str(tmp_path / "ema.safetensors"))
    consolidated = gpu_checkpoint.with_name(gpu_checkpoint.name + "_consolidated")
    resharded = tmp_path / "resharded"
    config = load_config(REPO / CONFIG, [*TINY, f"train.out_dir={resharded}", "parallel.zero_stage=1",
                                         "train.precision=bf16", "train.max_steps=5"])
    from diffmoe_scale.train.trainer import Trainer

    capsys.readouterr()
    assert Trainer(config, runtime).train(str(consolidated)) == 0
    assert f"resumed from {consolidated} at step 4" in capsys.readouterr().out
    assert [record["step"] for record in read_metrics(resharded)] == [5]


@pytest.mark.slow
def test_gpu_run_with_tensor_parallelism_zero2_and_bf16(tmp_path):
    result = tmp_path / "gpu.json"
    run(train_command(tmp_path / "run", "parallel.tp=2", "parallel.zero_stage=2", "train.precision=bf16",
                      "train.max_steps=2", gpu=True, result=result))
    assert json.loads(result.read_text())["exit_code"] == 0
