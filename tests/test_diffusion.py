"""Diffusion objectives against hand computations: rectified flow (authors' convention), its Euler and
Heun samplers, DiT's DDPM (schedule, respacing, DDIM/ancestral sampling, hybrid loss) and
classifier-free guidance. Fake models with known outputs make every check exact.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from diffmoe_scale.diffusion import DDPMObjective, FlowObjective, GaussianSchedule, guided_prediction
from diffmoe_scale.diffusion.ddpm import discretized_gaussian_log_likelihood, normal_kl

T = 1000


class Recorder(nn.Module):
    """out = a * z + t (2C channels: the second half is junk a learned variance would hold); records calls."""

    def __init__(self, a=0.5, aux=None):
        super().__init__()
        self.a = a
        self.aux = aux or {}
        self.calls = []

    def forward(self, z, t, y):
        self.calls.append((z.clone(), t.clone(), y.clone()))
        mean = self.a * z + t.to(z.dtype).view(-1, 1, 1, 1)
        return torch.cat([mean, torch.full_like(z, 123.0)], dim=1), dict(self.aux)


class ConstantVelocity(nn.Module):
    num_classes = 10

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, z, t, y):
        return self.fn(z, t), {}


# --------------------------------------------------------------------------------------------
# Flow


def test_flow_training_loss_recomputed_from_generator_draws():
    x = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(5)
    model = Recorder(aux={"predictor": torch.tensor(0.25)})
    objective = FlowObjective()
    draws = objective.draw(x.shape, torch.Generator().manual_seed(42), torch.float64)
    losses = objective.training_losses(model, x, y, *draws)

    generator = torch.Generator().manual_seed(42)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    t = torch.rand(5, generator=generator, dtype=torch.float64)
    t_ = t.view(-1, 1, 1, 1)
    z_t = t_ * x + (1 - t_) * noise  # t = 0 is noise, t = 1 is data

    (z_seen, t_seen, y_seen), = model.calls
    torch.testing.assert_close(z_seen, z_t, rtol=0, atol=1e-15)
    torch.testing.assert_close(t_seen, t, rtol=0, atol=0)  # the model sees t in [0, 1] itself
    assert torch.equal(y_seen, y)
    velocity = 0.5 * z_t + t_  # the model's first C channels; the variance half is ignored
    expected = ((velocity - (x - noise)) ** 2).mean()
    torch.testing.assert_close(losses["diffusion"], expected, rtol=1e-12, atol=0)
    assert set(losses) == {"diffusion", "predictor"} and losses["predictor"].item() == 0.25


def test_flow_target_is_data_minus_noise():
    # A zero-velocity model: the loss is the mean square of the target x - noise (not noise - x scaled, not eps).
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    model = ConstantVelocity(lambda z, t: torch.zeros_like(z))
    objective = FlowObjective()
    draws = objective.draw(x.shape, torch.Generator().manual_seed(1), torch.float64)
    losses = objective.training_losses(model, x, torch.zeros(3, dtype=torch.long), *draws)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(losses["diffusion"], ((x - noise) ** 2).mean())


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_flow_samplers_integrate_constant_velocity(sampler, steps):
    c = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    model = ConstantVelocity(lambda z, t: torch.cat([c, torch.full_like(c, 9.0)], dim=1))
    out = FlowObjective().sample(model, noise, torch.zeros(2, dtype=torch.long), steps=steps, sampler=sampler)
    torch.testing.assert_close(out, noise + c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_flow_time_grid_runs_from_zero_to_one(steps):
    # v(t) = c * t: exact endpoint noise + c/2. Heun (trapezoid) is exact for it; Euler
    # (left Riemann sum on t = 0, dt, ..., 1 - dt) gives c (1 - 1/steps) / 2.
    c = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    noise = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    model = ConstantVelocity(lambda z, t: c * t.view(-1, 1, 1, 1))
    y = torch.zeros(2, dtype=torch.long)
    heun = FlowObjective().sample(model, noise, y, steps=steps, sampler="heun")
    torch.testing.assert_close(heun, noise + c / 2, rtol=1e-12, atol=1e-12)
    euler = FlowObjective().sample(model, noise, y, steps=steps, sampler="euler")
    torch.testing.assert_close(euler, noise + c * (1 - 1 / steps) / 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler,growth", [("euler", lambda dt: 1 + dt), ("heun", lambda dt: 1 + dt + dt**2 / 2)])
def test_flow_samplers_on_linear_ode(sampler, growth):
    # v(z) = z: Euler multiplies by (1 + dt) per step, Heun by (1 + dt + dt^2/2).
    noise = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    model = ConstantVelocity(lambda z, t: z)
    out = FlowObjective().sample(model, noise, torch.zeros(3, dtype=torch.long), steps=10, sampler=sampler)
    torch.testing.assert_close(out, noise * growth(0.1) ** 10, rtol=1e-12, atol=1e-12)


def test_flow_sampler_applies_guidance():
    # cond velocity 1, uncond velocity 0 (label == num_classes): scale s gives velocity s.
    class LabelVelocity(nn.Module):
        num_classes = 10

        def forward(self, z, t, y):
            return (y < self.num_classes).to(z.dtype).view(-1, 1, 1, 1).expand_as(z).clone(), {}

    noise = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    out = FlowObjective().sample(LabelVelocity(), noise, torch.tensor([3, 4]), steps=5, sampler="euler", cfg_scale=2.5)
    torch.testing.assert_close(out, torch.full_like(noise, 2.5))


# --------------------------------------------------------------------------------------------
# DDPM schedule


def test_linear_schedule_matches_numpy():
    schedule = GaussianSchedule.linear(T, 1e-4, 0.02)
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), alphas_cumprod, rtol=1e-12)
    prev = np.append(1.0, alphas_cumprod[:-1])
    np.testing.assert_allclose(schedule.alphas_cumprod_prev.numpy(), prev, rtol=1e-12)
    posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
    np.testing.assert_allclose(schedule.posterior_variance.numpy(), posterior_variance, rtol=1e-12)
    clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))  # improved-diffusion's clip
    np.testing.assert_allclose(schedule.posterior_log_variance.numpy(), clipped, rtol=1e-12)
    assert torch.equal(schedule.timesteps, torch.arange(T))


def test_single_respaced_step_starts_from_pure_noise():
    respaced = GaussianSchedule.linear(T, 1e-4, 0.02).respaced(1)
    assert respaced.timesteps.tolist() == [T - 1]
    assert respaced.alphas_cumprod_prev.tolist() == [1.0]  # one step lands on the x0 prediction


@pytest.mark.parametrize("steps", [2, 3, 10, 50, 250, 999, 1000])
def test_respaced_keeps_alphas_cumprod(steps):
    base = GaussianSchedule.linear(T, 1e-4, 0.02)
    respaced = base.respaced(steps)
    ts = respaced.timesteps
    assert len(ts) == len(respaced.betas) == steps
    assert ts[0] == 0 and ts[-1] == T - 1
    assert (ts[1:] > ts[:-1]).all()
    torch.testing.assert_close(respaced.alphas_cumprod, base.alphas_cumprod[ts], rtol=1e-12, atol=0)
    assert ((respaced.betas > 0) & (respaced.betas < 1)).all()
    if steps == T:
        torch.testing.assert_close(respaced.betas, base.betas, rtol=1e-10, atol=0)
    # Evenly spaced: gaps differ by at most one.
    gaps = ts[1:] - ts[:-1]
    assert gaps.max() - gaps.min() <= 1


def test_q_sample_predict_x0_round_trip():
    schedule = GaussianSchedule.linear(T, 1e-4, 0.02)
    x0 = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    step = torch.tensor([0, 1, 10, 500, 998, 999])
    xt = schedule.q_sample(x0, step, noise)
    a = schedule.alphas_cumprod[step].view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.predict_x0(xt, step, noise), x0, rtol=1e-9, atol=1e-9)


def test_posterior_mean_is_gaussian_posterior():
    # q(x_{t-1} | x_t, x_0) mean, by Bayes on the two Gaussians, for a scalar example.
    schedule = GaussianSchedule.linear(T, 1e-4, 0.02)
    step = torch.tensor([300])
    x0 = torch.tensor([[[[0.7]]]], dtype=torch.float64)
    xt = torch.tensor([[[[-0.2]]]], dtype=torch.float64)
    a_prev = schedule.alphas_cumprod[299].item()
    beta = schedule.betas[300].item()
    # prior x_{t-1} ~ N(sqrt(a_prev) x0, 1 - a_prev); likelihood x_t ~ N(sqrt(1-beta) x_{t-1}, beta)
    precision = 1 / (1 - a_prev) + (1 - beta) / beta
    mean = (math.sqrt(a_prev) * 0.7 / (1 - a_prev) + math.sqrt(1 - beta) * -0.2 / beta) / precision
    torch.testing.assert_close(schedule.posterior_mean(x0, xt, step).item(), mean, rtol=1e-10, atol=0)
    torch.testing.assert_close(schedule.posterior_variance[300].item(), 1 / precision, rtol=1e-10, atol=0)


# --------------------------------------------------------------------------------------------
# DDPM sampling


class TrueEps(nn.Module):
    """Predicts the exact noise that takes a known x0 to z at the model's (original) timestep."""

    num_classes = 10

    def __init__(self, x0, schedule, learn_sigma):
        super().__init__()
        self.x0, self.schedule, self.learn_sigma = x0, schedule, learn_sigma
        self.timesteps_seen = []
        self.eps_seen = []

    def forward(self, z, t, y):
        self.timesteps_seen.append(int(t[0]))
        a = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (z - a.sqrt() * self.x0) / (1 - a).sqrt()
        self.eps_seen.append(eps)
        if self.learn_sigma:
            eps = torch.cat([eps, torch.rand_like(eps) * 2 - 1], dim=1)
        return eps, {}


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("steps", [1000, 50, 7])
def test_ddim_recovers_x0_from_true_eps(learn_sigma, steps):
    objective = DDPMObjective(T, 1e-4, 0.02, learn_sigma)
    x0 = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 1.8 - 0.9  # inside the [-1, 1] clip
    noise = torch.randn_like(x0)
    x_T = objective.schedule.q_sample(x0, torch.full((3,), T - 1), noise)
    model = TrueEps(x0, objective.schedule, learn_sigma)
    out = objective.sample(model, x_T, torch.zeros(3, dtype=torch.long), steps=steps, sampler="ddim")
    torch.testing.assert_close(out, x0, rtol=1e-9, atol=1e-9)
    # The model is called once per kept step, with original timesteps, from T-1 down to 0.
    assert len(model.timesteps_seen) == steps
    assert model.timesteps_seen[0] == T - 1 and model.timesteps_seen[-1] == 0
    assert model.timesteps_seen == sorted(model.timesteps_seen, reverse=True)
    # Deterministic DDIM keeps every z_t on the line sqrt(a_t) x0 + sqrt(1 - a_t) eps of the first noise.
    for eps in model.eps_seen:
        torch.testing.assert_close(eps, noise, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("steps", [1, 20])
def test_ancestral_ends_at_x0_for_true_eps(learn_sigma, steps):
    # At the last step (t = 0) the posterior mean is x0 exactly and no noise is added.
    objective = DDPMObjective(T, 1e-4, 0.02, learn_sigma)
    x0 = torch.rand(2, 1, 4, 4, dtype=torch.float64) * 1.8 - 0.9
    x_T = torch.randn_like(x0)
    torch.manual_seed(0)
    out = objective.sample(TrueEps(x0, objective.schedule, learn_sigma), x_T, torch.zeros(2, dtype=torch.long),
                           steps=steps, sampler="ancestral")
    torch.testing.assert_close(out, x0, rtol=1e-9, atol=1e-9)


def test_ancestral_is_stochastic_and_ddim_is_not():
    objective = DDPMObjective(T, 1e-4, 0.02, learn_sigma=False)
    model = ConstantVelocity(lambda z, t: 0.5 * z)  # some eps model
    x_T = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    a = objective.sample(model, x_T, y, steps=10, sampler="ddim")
    b = objective.sample(model, x_T, y, steps=10, sampler="ddim")
    assert torch.equal(a, b)
    torch.manual_seed(1)
    c = objective.sample(model, x_T, y, steps=10, sampler="ancestral")
    torch.manual_seed(2)
    d = objective.sample(model, x_T, y, steps=10, sampler="ancestral")
    assert not torch.allclose(c, d)


# --------------------------------------------------------------------------------------------
# DDPM losses


def test_normal_kl():
    mean = torch.randn(10, dtype=torch.float64)
    logvar = torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(mean, logvar, mean, logvar), torch.zeros(10, dtype=torch.float64))
    # KL(N(0, 1) || N(1, e^2)) = log(e) + (1 + 1) / (2 e^2) - 1/2
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(2.0))
    torch.testing.assert_close(kl, torch.tensor(1.0 + 2 / (2 * math.e**2) - 0.5))
    other = normal_kl(mean, logvar, mean + 0.3, logvar - 0.2)
    assert (other > 0).all()


def test_discretized_likelihood_sums_to_one_over_bins():
    # 256 bins of width 2/255 centred on -1 .. 1: the probabilities add up to 1.
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.1, math.log(0.3)), (-0.8, math.log(0.05))):
        logp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert (logp <= 0).all()
        torch.testing.assert_close(logp.exp().sum().item(), 1.0, rtol=1e-3, atol=0)


@pytest.mark.parametrize("learn_sigma,keys", [(True, {"diffusion", "vb"}), (False, {"diffusion"})])
def test_ddpm_training_losses(learn_sigma, keys):
    objective = DDPMObjective(T, 1e-4, 0.02, learn_sigma)
    x = torch.rand(6, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    y = torch.arange(6)

    class RandomModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []
            self.out = torch.randn(6, 4 if learn_sigma else 2, 4, 4, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(3)).requires_grad_(True)

        def forward(self, z, t, y):
            self.calls.append((z.clone(), t.clone()))
            out = self.out
            if learn_sigma:  # variance values in [-1, 1], as a trained model gives
                out = torch.cat([out[:, :2], out[:, 2:].tanh()], dim=1)
            return out, {}

    model = RandomModel()
    losses = objective.training_losses(model, x, y, *objective.draw(x.shape, torch.Generator().manual_seed(9), x.dtype))
    assert set(losses) == keys

    generator = torch.Generator().manual_seed(9)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    step = torch.randint(0, T, (6,), generator=generator)
    (z_seen, t_seen), = model.calls
    assert torch.equal(t_seen, step)
    torch.testing.assert_close(z_seen, objective.schedule.q_sample(x, step, noise), rtol=0, atol=1e-15)
    torch.testing.assert_close(losses["diffusion"], ((model.out[:, :2] - noise) ** 2).mean(), rtol=1e-12, atol=0)

    if learn_sigma:
        vb = losses["vb"]
        assert torch.isfinite(vb) and vb > 0
        # The vb term trains only the variance channels; the mean gets its gradient from the MSE alone.
        grad = torch.autograd.grad(vb, model.out)[0]
        assert torch.count_nonzero(grad[:, :2]) == 0
        assert grad[:, 2:].abs().sum() > 0


def test_vb_is_zero_for_the_true_posterior_and_nll_at_step_zero():
    objective = DDPMObjective(T, 1e-4, 0.02, learn_sigma=True)
    schedule = objective.schedule
    x0 = torch.rand(4, 1, 4, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    step = torch.tensor([1, 17, 500, 999])
    xt = schedule.q_sample(x0, step, noise)
    # eps exact and variance value -1 (the posterior's own variance): the KL vanishes.
    vb = objective._vb_bits(x0, xt, step, noise, -torch.ones_like(x0))
    torch.testing.assert_close(vb, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-9)
    # Variance value +1 (beta_t) differs from the posterior's: KL > 0.
    assert (objective._vb_bits(x0, xt, step, noise, torch.ones_like(x0)) > 0).all()
    # Step 0 is the decoder NLL (in bits), positive even for the exact eps.
    step0 = torch.zeros(4, dtype=torch.long)
    xt0 = schedule.q_sample(x0, step0, noise)
    nll = objective._vb_bits(x0, xt0, step0, noise, torch.zeros_like(x0))
    assert torch.isfinite(nll).all() and (nll > 0).all()


# --------------------------------------------------------------------------------------------
# Classifier-free guidance


class LabelModel(nn.Module):
    """Output 2C channels depending on x, t and the label; records batch sizes and labels seen."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, y):
        self.seen.append(y.clone())
        label = y.to(x.dtype).view(-1, 1, 1, 1)
        mean = x * (1 + label) + t.view(-1, 1, 1, 1)
        var = x - label
        return torch.cat([mean, var], dim=1), {"aux": torch.tensor(1.0)}


def test_guidance_scale_one_is_the_plain_output():
    model = LabelModel()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t, y = torch.rand(3, dtype=torch.float64), torch.tensor([0, 5, 9])
    out = guided_prediction(model, x, t, y, 1.0)
    torch.testing.assert_close(out, model(x, t, y)[0], rtol=0, atol=0)
    assert len(model.seen[0]) == 3  # no doubled batch


@pytest.mark.parametrize("scale", [0.0, 1.5, 4.0])
def test_guidance_combines_cond_and_uncond_on_mean_channels(scale):
    model = LabelModel()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t, y = torch.rand(3, dtype=torch.float64), torch.tensor([0, 5, 9])
    out = guided_prediction(model, x, t, y, scale)
    assert torch.equal(model.seen[0], torch.tensor([0, 5, 9, 10, 10, 10]))  # null label = num_classes
    cond = model(x, t, y)[0]
    uncond = model(x, t, torch.full_like(y, 10))[0]
    torch.testing.assert_close(out[:, :2], uncond[:, :2] + scale * (cond[:, :2] - uncond[:, :2]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, 2:], cond[:, 2:], rtol=0, atol=0)
    assert out.shape == cond.shape


# Guidance with MoE routing that depends on the batch: each half is its own pool, as two forwards.

GUIDED_MOE = {
    "diffmoe_threshold": ["moe.ffn=diffmoe", "moe.inference_routing=threshold"],
    "diffmoe_capacity": ["moe.ffn=diffmoe", "moe.inference_routing=capacity"],
    "token_choice_limited": ["moe.ffn=token_choice", "moe.capacity_factor=1.0"],
}


def tiny_moe_dit(overrides):
    from diffmoe_scale.config import load_config
    from diffmoe_scale.models import build_model

    config = load_config("configs/digits_diffmoe_e4_flow.yaml", ["model.depth=2", "model.hidden_size=16",
                                                                 "model.num_heads=2", "moe.interleave=false",
                                                                 *overrides])
    torch.manual_seed(0)
    model = build_model(config).double().eval()
    for param in model.parameters():  # away from DiT's zero init: every block and expert matters
        nn.init.normal_(param, std=0.3)
    for layer in model.moe_layers():
        if hasattr(layer, "thresholds"):
            layer.thresholds.fill_(0.5)  # mid-range: experts take different, batch-dependent counts
    return model


def routing_masks(model):
    """Per MoE layer, the [tokens, E] routing mask of the last forward."""
    masks = []
    for layer in model.moe_layers():
        mask = torch.zeros(layer.last_num_tokens, layer.num_experts, dtype=torch.bool)
        masks.append(mask.index_put_((layer.last_pairs[1], layer.last_pairs[0]), torch.tensor(True)))
    return masks


@pytest.mark.parametrize("kind", GUIDED_MOE)
def test_guidance_routes_each_half_as_its_own_forward(kind):
    model = tiny_moe_dit(GUIDED_MOE[kind])
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 8, 8, generator=generator, dtype=torch.float64)
    t, y, scale = torch.rand(4, generator=generator, dtype=torch.float64), torch.tensor([0, 3, 7, 9]), 2.0
    with torch.no_grad():
        cond = model(x, t, y)[0]
        cond_masks = routing_masks(model)
        uncond = model(x, t, torch.full_like(y, 10))[0]
        uncond_masks = routing_masks(model)
        ours = guided_prediction(model, x, t, y, scale)
        ours_masks = routing_masks(model)
        joint = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]))[0]
        joint_masks = routing_masks(model)
    assert all(layer.batch_pools == 1 for layer in model.moe_layers())  # the guidance's pools end with it
    reference = uncond[:, :1] + scale * (cond[:, :1] - uncond[:, :1])
    torch.testing.assert_close(ours[:, :1], reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[:, 1:], cond[:, 1:], rtol=1e-10, atol=1e-12)
    for mask, cond_mask, uncond_mask in zip(ours_masks, cond_masks, uncond_masks, strict=True):
        assert torch.equal(mask, torch.cat([cond_mask, uncond_mask]))
    # One pool over both halves (what guidance did before) routes differently and gives another output.
    assert any(not torch.equal(joint_mask, mask) for joint_mask, mask in zip(joint_masks, ours_masks))
    old = joint[4:, :1] + scale * (joint[:4, :1] - joint[4:, :1])
    assert (old - reference).abs().max() > 1e-3


def test_pool_order_puts_each_part_of_every_rank_together():
    from diffmoe_scale.models.pools import pool_order

    # 2 ranks of 6 rows, each in 2 parts of 3 rows: part 0 of rank 0, part 0 of rank 1, then the parts 1.
    assert pool_order(2, 6, 2).tolist() == [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]
    assert pool_order(3, 4, 1).tolist() == list(range(12))
