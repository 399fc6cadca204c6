"""Exponential moving average of a model's weights (kept in fp32, evaluated as its own module)."""
import torch


class EMA:
    """`model` is a second instance of the trained model, built the same way (it starts from that
    model's weights); a deep copy would not do once layers hold process groups."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = model.float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_params = list(self.model.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        # Buffers (e.g. DiffMoE thresholds) are running statistics already: copy them.
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
