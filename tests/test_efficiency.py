"""Model FLOPs counted from the real modules equal a closed-form count; peaks and MFU."""
import pytest
import torch

from diffmoe_scale.config import load_config
from diffmoe_scale.models import build_model
from diffmoe_scale.train.efficiency import Efficiency, peak_tflops, training_flops_per_image
from diffmoe_scale.train.metrics import efficiency

CONFIG = "configs/digits_diffmoe_e4_flow.yaml"


def closed_form_training_flops(D: int, S: int, E: int, patch_in: int, patch_out: int, depth: int) -> int:
    """One image's forward and backward, matmuls and attention only. A matmul of M rows, K -> N costs 2MKN
    forward, as much again for the weight gradient, and again for the input gradient where the input needs
    one (not the latents, the timestep frequencies or the predictor's detached input). Attention: 4 S^2 D
    forward, 2.5 times that backward (torch's count, the flash kernels' recomputation included)."""
    def linear(rows, k, n, input_grad=True):
        return 2 * rows * k * n * (3 if input_grad else 2)

    total = linear(S, patch_in, D, input_grad=False)  # patch embedding (a convolution)
    total += linear(1, 256, D, input_grad=False) + linear(1, D, D)  # timestep MLP
    for block in range(depth):
        total += linear(1, D, 6 * D) + linear(S, D, 3 * D) + linear(S, D, D) + 3.5 * 4 * S * S * D
        if block % 2 == 1:  # MoE: router, experts on S pairs (capacity 1), predictor
            total += linear(S, D, E) + linear(S, D, 4 * D) + linear(S, 4 * D, D)
            total += linear(S, D, D, input_grad=False) + linear(S, D, E)
        else:
            total += linear(S, D, 4 * D) + linear(S, 4 * D, D)
    return total + linear(1, D, 2 * D) + linear(S, D, patch_out)  # final layer


@pytest.mark.parametrize("checkpointing", [False, True])
def test_counted_training_flops_equal_the_closed_form(checkpointing):
    config = load_config(CONFIG, ["model.depth=4", "model.hidden_size=32", "model.num_heads=2"])
    model = build_model(config).train()
    for block in model.blocks:
        block.checkpoint = checkpointing  # the count leaves recomputation out
    counted = training_flops_per_image(model, config, 1, torch.float32, torch.device("cpu"))
    # 8x8 digits in 2x2 patches: 16 tokens of 4 values; learned sigma: 2 channels out.
    assert counted == closed_form_training_flops(D=32, S=16, E=4, patch_in=4, patch_out=8, depth=4)
    assert all(param.grad is None for param in model.parameters())
    assert all(layer.pending_quantile is None for layer in model.moe_layers())
    assert [block.checkpoint for block in model.blocks] == [checkpointing] * 4


def test_peak_comes_from_the_config_or_the_gpu_name(monkeypatch):
    config = load_config(CONFIG, ["train.precision=bf16", "parallel.zero_stage=1"])
    assert peak_tflops(config, torch.device("cpu")) is None  # no table entry for a CPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_tflops(config, torch.device("cuda")) == 989.4
    fp32 = load_config(CONFIG, ["train.tf32=false"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert peak_tflops(fp32, torch.device("cuda")) == 19.5
    assert peak_tflops(load_config(CONFIG), torch.device("cuda")) == 156.0  # TF32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_tflops(config, torch.device("cuda")) is None
    assert peak_tflops(load_config(CONFIG, ["train.peak_tflops=123"]), torch.device("cuda")) == 123.0


def test_mfu_and_the_log_line():
    config = load_config(CONFIG, ["train.peak_tflops=100", "train.global_batch_size=64"])
    record = Efficiency(config, flops_per_image=1e12, world_size=4, device=torch.device("cpu")).record(step_time=0.4)
    assert record["model_tflop_per_step"] == 64.0
    assert record["tflops_per_device"] == pytest.approx(40.0) and record["mfu"] == pytest.approx(0.4)
    assert efficiency(record) == " | 40 TFLOP/s/dev, MFU 40.0%"
    assert efficiency({**record, "mfu": None}) == " | 40 TFLOP/s/dev"
