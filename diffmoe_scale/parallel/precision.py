"""Mixed precision as production trainers do it: the transformer's matmuls in bf16, everything else fp32.

DeepSpeed keeps the weights in the training dtype and fp32 masters in the optimizer's partitions; it
accumulates and reduces gradients in fp32 (`deepspeed_precision`). The diffusion maths (draws, schedule,
x_t, loss) stays fp32 around the model: only the model's input is cast to the training dtype and its
prediction comes back in fp32 (`CastAtModelBoundary`, as Megatron's Float16Module does). Routing runs in
fp32 inside the MoE layers. TF32 serves the matmuls that stay fp32 on GPUs that have it.
"""
import os

import torch

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def enable_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and later); no effect elsewhere."""
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def use_deterministic_algorithms(enabled: bool) -> None:
    """Bit-exact GPU runs (same hardware and software): torch's deterministic kernels (index_add and
    scatter without atomics, cuBLAS with a fixed workspace) and attention through the math kernel, whose
    backward needs no atomics; slower. CPU runs are deterministic without it."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first use
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def deepspeed_precision(precision: str) -> dict:
    """The DeepSpeed config entries of a training precision: bf16/fp16 weights with gradients accumulated
    and reduced in fp32 (with ZeRO 1 and bf16 DeepSpeed then uses its BF16_Optimizer, with ZeRO 2 its
    ZeRO optimizer with fp32 gradient partitions)."""
    reduced = precision != "fp32"
    return {
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"} if reduced else {}),
    }


class CastAtModelBoundary:
    """Calls `model` with its image input in `dtype` and returns the prediction in fp32 (the auxiliary
    losses are fp32 already). Timesteps stay fp32: the model embeds them in fp32."""

    def __init__(self, model, dtype: torch.dtype):
        self.model, self.dtype = model, dtype

    def __call__(self, x, t, y):
        prediction, losses = self.model(x.to(self.dtype), t, y)
        return prediction.float(), losses

    def __getattr__(self, name):  # otherwise the model's (num_classes, moe_layers, ...)
        return getattr(self.model, name)
