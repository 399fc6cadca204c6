"""Small float64 inputs for the layer tests that compare MoE layers with loop references."""
import torch

DIGITS_CONFIG = "configs/digits_diffmoe_e4_flow.yaml"
DIM, HIDDEN = 6, 12


def random_input(batch, seq, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, DIM, generator=generator, dtype=torch.float64).requires_grad_(True)


def expert_params(layer):
    return [layer.router.weight, layer.experts.w1, layer.experts.b1, layer.experts.w2, layer.experts.b2]
