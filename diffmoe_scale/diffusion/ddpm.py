"""DDPM as in DiT: epsilon prediction, linear betas, optional learned variance (hybrid loss).

With a learned variance the model's extra output channels v in [-1, 1] interpolate the log
variance between the clipped posterior variance and beta_t, trained by the variational bound with
the mean held fixed (Nichol & Dhariwal). Sampling runs on an evenly respaced subset of timesteps:
ancestral (with the model's variance) or DDIM (eta = 0).
"""
import math

import torch

from .guidance import guided_prediction


class GaussianSchedule:
    """Coefficients of a discrete Gaussian diffusion; `timesteps[i]` is the model's timestep of step i."""

    def __init__(self, betas: torch.Tensor, timesteps: torch.Tensor):
        self.betas = betas.double()
        self.timesteps = timesteps
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.alphas_cumprod_prev = prev
        self.posterior_variance = self.betas * (1.0 - prev) / (1.0 - self.alphas_cumprod)
        # Step 0 has no posterior variance: use step 1's for the log, as improved-diffusion does (a one-step
        # schedule has none: beta stands in; the last step adds no noise anyway).
        first = self.posterior_variance[1:2] if len(self.betas) > 1 else self.betas
        self.posterior_log_variance = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef_x0 = self.betas * prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (1.0 - prev) * (1.0 - self.betas).sqrt() / (1.0 - self.alphas_cumprod)

    @classmethod
    def linear(cls, num_timesteps: int, beta_start: float, beta_end: float):
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        return cls(betas, torch.arange(num_timesteps))

    def respaced(self, steps: int) -> "GaussianSchedule":
        """`steps` evenly spaced timesteps of this schedule, with betas that keep their alphas_cumprod."""
        total = len(self.betas)
        if steps == 1:  # a single step must start from pure noise
            keep = [total - 1]
        else:
            keep = sorted({round(i * (total - 1) / (steps - 1)) for i in range(steps)})
        kept_cumprod = self.alphas_cumprod[keep]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), kept_cumprod[:-1]])
        return GaussianSchedule(1.0 - kept_cumprod / prev, self.timesteps[keep])

    def at(self, values: torch.Tensor, step: torch.Tensor, like: torch.Tensor):
        """values[step] shaped to broadcast against `like`."""
        out = values.to(like.device)[step].to(like.dtype)
        return out.view(-1, *[1] * (like.dim() - 1))

    def q_sample(self, x0, step, noise):
        a = self.at(self.alphas_cumprod, step, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, xt, step, eps):
        a = self.at(self.alphas_cumprod, step, xt)
        return (xt - (1 - a).sqrt() * eps) / a.sqrt()

    def posterior_mean(self, x0, xt, step):
        return self.at(self.posterior_mean_coef_x0, step, xt) * x0 + self.at(self.posterior_mean_coef_xt, step, xt) * xt

    def model_log_variance(self, var_values, step, like):
        if var_values is None:  # fixed (small) variance
            return self.at(self.posterior_log_variance, step, like)
        frac = (var_values + 1) / 2
        min_log = self.at(self.posterior_log_variance, step, like)
        max_log = self.at(self.betas.log(), step, like)
        return frac * max_log + (1 - frac) * min_log


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """Log-likelihood of x in [-1, 1], quantised to 256 bins, under N(mean, exp(log_scale)^2)."""
    def std_normal_cdf(v):  # tanh approximation, as in improved-diffusion
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_minus = std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_minus = (1.0 - cdf_minus).clamp(min=1e-12).log()
    log_cdf_delta = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_cdf_delta))


class DDPMObjective:
    samplers = ("ancestral", "ddim")

    def __init__(self, num_timesteps: int, beta_start: float, beta_end: float, learn_sigma: bool):
        self.schedule = GaussianSchedule.linear(num_timesteps, beta_start, beta_end)
        self.learn_sigma = learn_sigma

    def draw(self, shape, generator: torch.Generator, dtype=torch.float32, device=None):
        """The random inputs of a batch of `shape`: (noise, timesteps), noise drawn first."""
        device = generator.device if device is None else device
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        step = torch.randint(0, len(self.schedule.betas), (shape[0],), generator=generator, device=device)
        return noise, step

    def noise_level(self, step: torch.Tensor) -> torch.Tensor:
        """0 for data, 1 for pure noise: the step's position in the schedule."""
        return (step.float() + 1) / len(self.schedule.betas)

    def training_losses(self, model, x, y, noise, step):
        schedule, channels = self.schedule, x.shape[1]
        xt = schedule.q_sample(x, step, noise)
        out, aux_losses = model(xt, step, y)
        losses = {"diffusion": ((out[:, :channels] - noise) ** 2).mean(), **aux_losses}
        if self.learn_sigma:
            # Variational bound for the variance only: the mean's gradient comes from the MSE.
            eps = out[:, :channels].detach()
            losses["vb"] = self._vb_bits(x, xt, step, eps, out[:, channels:]).mean()
        return losses

    def _vb_bits(self, x0, xt, step, eps, var_values):
        schedule = self.schedule
        true_mean = schedule.posterior_mean(x0, xt, step)
        true_log_var = schedule.at(schedule.posterior_log_variance, step, xt)
        model_mean = schedule.posterior_mean(schedule.predict_x0(xt, step, eps), xt, step)
        model_log_var = schedule.model_log_variance(var_values, step, xt)
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(1)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(1)
        return torch.where(step == 0, nll, kl) / math.log(2.0)

    @torch.no_grad()
    def sample(self, model, noise, y, *, steps: int, sampler: str, cfg_scale: float = 1.0):
        schedule = self.schedule.respaced(steps)
        x, channels = noise, noise.shape[1]
        for i in reversed(range(len(schedule.betas))):
            step = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = guided_prediction(model, x, schedule.timesteps.to(x.device)[step], y, cfg_scale)
            eps = out[:, :channels]
            x0 = schedule.predict_x0(x, step, eps).clamp(-1, 1)
            if sampler == "ddim":
                eps = (x - schedule.at(schedule.alphas_cumprod, step, x).sqrt() * x0) / (
                    1 - schedule.at(schedule.alphas_cumprod, step, x)).sqrt()
                prev = schedule.at(schedule.alphas_cumprod_prev, step, x)
                x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
                continue
            mean = schedule.posterior_mean(x0, x, step)
            var_values = out[:, channels:] if self.learn_sigma else None
            log_var = schedule.model_log_variance(var_values, step, x)
            x = mean + (torch.exp(0.5 * log_var) * torch.randn_like(x) if i > 0 else 0.0)
        return x
