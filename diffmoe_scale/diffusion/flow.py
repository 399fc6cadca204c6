"""Rectified flow in the DiffMoE authors' convention.

t ~ U(0, 1), z_t = t * x + (1 - t) * noise (t = 0 is noise, t = 1 is data), the model predicts the
velocity x - noise and is trained by mean squared error; sampling integrates from t = 0 to 1.
The model sees t itself (in [0, 1]) as its timestep, as the authors' code does.
"""
import torch

from .guidance import guided_prediction


class FlowObjective:
    samplers = ("euler", "heun")

    def draw(self, shape, generator: torch.Generator, dtype=torch.float32, device=None):
        """The random inputs of a batch of `shape`: (noise, t), noise drawn first."""
        device = generator.device if device is None else device
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return noise, torch.rand(shape[0], generator=generator, device=device, dtype=dtype)

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """0 for data, 1 for pure noise: the input is t * data + (1 - t) * noise."""
        return 1 - t.float()

    def training_losses(self, model, x, y, noise, t):
        t_ = t.view(-1, *[1] * (x.dim() - 1))
        out, aux_losses = model(t_ * x + (1 - t_) * noise, t, y)
        velocity = out[:, : x.shape[1]]
        return {"diffusion": ((velocity - (x - noise)) ** 2).mean(), **aux_losses}

    @torch.no_grad()
    def sample(self, model, noise, y, *, steps: int, sampler: str, cfg_scale: float = 1.0):
        def velocity(z, t_value):
            t = torch.full((z.shape[0],), t_value, device=z.device, dtype=z.dtype)
            return guided_prediction(model, z, t, y, cfg_scale)[:, : z.shape[1]]

        z, dt = noise, 1.0 / steps
        for i in range(steps):
            t = i * dt
            v = velocity(z, t)
            if sampler == "heun":
                v = 0.5 * (v + velocity(z + dt * v, t + dt))
            z = z + dt * v
        return z
