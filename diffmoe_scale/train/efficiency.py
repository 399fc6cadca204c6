"""How close a run is to the hardware: model FLOPs per step, achieved TFLOP/s per device and MFU.

Model FLOPs are counted, not estimated: torch's FlopCounterMode watches one training forward and backward
of the real model (matmuls, batched expert matmuls, attention, convolutions) on one image per
data-parallel rank, summed over the ranks, and a step is the global batch times that. Every FLOP of a DiT
is per image (attention stays within a sample) and expert choice gives every expert the same share of a
pool, so this count is exact up to the rounding of the tokens per expert. Recomputation by activation
checkpointing is not model work and is not counted (the counting pass runs without it); the
attention backward counts as torch's counter counts it (2.5 times the forward, the flash kernels'
recomputed scores included).

MFU = achieved FLOP/s per device / the device's dense peak in the training precision: from `PEAK_TFLOPS`
by the GPU's name, or `train.peak_tflops` (which wins; needed on a CPU or an unlisted GPU).
"""
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..config import Config
from ..parallel.expert_parallel import take_pending_quantiles

# Dense (no sparsity) tensor-core peaks per GPU in TFLOP/s, SXM parts, from NVIDIA's datasheets.
PEAK_TFLOPS = {
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}

aten = torch.ops.aten


def _cpu_sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter knows the GPU attention kernels; the CPU's fused kernel counts as they do.
CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}


def peak_tflops(config: Config, device: torch.device) -> float | None:
    """Dense peak TFLOP/s of one device in the training precision (fp32 matmuls run as TF32 where enabled)."""
    if config.train.peak_tflops is not None:
        return config.train.peak_tflops
    if device.type != "cuda":
        return None
    precision = config.train.precision
    if precision == "fp32":
        precision = "tf32" if config.train.tf32 else "fp32"
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] for chip, peaks in PEAK_TFLOPS.items() if chip in name), None)


def training_flops_per_image(model, config: Config, dp_size: int, dtype: torch.dtype, device: torch.device) -> float:
    """FLOPs of one training forward and backward per image (collective: every rank runs one image).

    Leaves no trace: gradients are returned, not accumulated; the routing's pending threshold quantiles are
    dropped and the all-to-all row counts restored."""
    size, blocks = config.model.input_size, list(model.blocks)
    x = torch.zeros(1, config.model.in_channels, size, size, device=device, dtype=dtype)
    t, y = torch.full((1,), 0.5, device=device), torch.zeros(1, dtype=torch.long, device=device)
    checkpointed = [block.checkpoint for block in blocks]
    rows_sent = [list(getattr(layer.dispatch, "rows_sent", [])) for layer in model.moe_layers()]
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for block in blocks:
            block.checkpoint = False
        # Counted on the eager modules (compiled blocks run the same maths): no compilation for this one forward.
        with torch.compiler.set_stance("force_eager"), \
                FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            prediction, losses = model(x, t, y)
            loss = prediction.float().square().mean() + sum(losses.values())
            torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for block, flag in zip(blocks, checkpointed):
            block.checkpoint = flag
        for layer, rows in zip(model.moe_layers(), rows_sent):
            if rows:
                layer.dispatch.rows_sent = rows
        take_pending_quantiles(model)
    flops = torch.tensor(float(counter.get_total_flops()), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flops)
    return flops.item() / dp_size


class Efficiency:
    """Per logging window: model TFLOP/s per device and MFU from the step time."""

    def __init__(self, config: Config, flops_per_image: float, world_size: int, device: torch.device):
        self.step_flops = flops_per_image * config.train.global_batch_size
        self.world_size = world_size
        self.peak = peak_tflops(config, device)

    def record(self, step_time: float) -> dict:
        tflops = self.step_flops / step_time / self.world_size / 1e12
        return {"model_tflop_per_step": self.step_flops / 1e12, "tflops_per_device": tflops,
                "mfu": tflops / self.peak if self.peak else None}
