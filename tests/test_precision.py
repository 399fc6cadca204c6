"""bf16 as production trainers run it, against fp32: the diffusion maths stays fp32 around a bf16 model,
routing decides in fp32, the combine accumulates in fp32, thresholds stay fp32, and a bf16 run of the
trainer follows the fp32 run."""
import copy
from pathlib import Path

import pytest
import torch

from diffmoe_scale.config import load_config
from diffmoe_scale.diffusion import DDPMObjective, FlowObjective
from diffmoe_scale.models import DiffMoELayer
from diffmoe_scale.models.experts import weighted_sum, wide_linear
from diffmoe_scale.models.pair_rows import token_order
from diffmoe_scale.parallel.precision import CastAtModelBoundary, enable_tf32
from tests.helpers import NARROW, read_metrics

REPO = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16


class InputRecorder(torch.nn.Module):
    """A model that records what it is called with and predicts zeros in its parameter's dtype."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros((), dtype=BF16))
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x, t))
        return (x * self.weight).repeat(1, 2, 1, 1), {}


def test_ddpm_in_bf16_noises_every_timestep():
    """In bf16, 1 - alpha_bar of the first DDPM steps rounds to 0: x_t would be the clean image. Computed in
    fp32 and cast once, the bf16 input the model sees differs from the clean image at every step."""
    objective = DDPMObjective(1000, 1e-4, 0.02, learn_sigma=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1000, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(x.shape, generator=generator)
    model = InputRecorder()
    losses = objective.training_losses(CastAtModelBoundary(model, BF16), x, torch.zeros(1000, dtype=torch.long),
                                       noise, torch.arange(1000))
    (seen, _), = model.calls
    assert seen.dtype == BF16 and all(loss.dtype == torch.float32 for loss in losses.values())
    changed = (seen != x.to(BF16)).flatten(1).float().mean(1)  # per timestep
    assert changed.min() > 0.5, f"timestep {changed.argmin().item()}: only {changed.min():.0%} of the values noised"
    bf16_coefficient = (1 - objective.schedule.alphas_cumprod[:10].to(BF16)).sqrt()
    assert (bf16_coefficient == 0).any()  # what bf16 maths would have done: no noise at all there


def test_flow_timesteps_reach_the_model_in_fp32_as_drawn():
    objective = FlowObjective()
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    noise, t = objective.draw(x.shape, torch.Generator().manual_seed(1))
    assert t.dtype == torch.float32 and len(t.unique()) == 64  # bf16 has 2^7 values per octave: 64 draws in
    model = InputRecorder()                                     # [0, 1) would collide
    objective.training_losses(CastAtModelBoundary(model, BF16), x, torch.zeros(64, dtype=torch.long), noise, t)
    (seen_x, seen_t), = model.calls
    assert seen_x.dtype == BF16 and torch.equal(seen_t, t)


def moe_layer(seed=0, dim=64, experts=8):
    torch.manual_seed(seed)
    layer = DiffMoELayer(dim, 4 * dim, experts, capacity=1.0, pool="local")
    torch.nn.init.normal_(layer.router.weight, std=0.006)  # as trained models start: nearly uniform scores
    return layer.train()


def routing_mask(layer) -> torch.Tensor:
    pair_expert, pair_token = layer.last_pairs
    mask = torch.zeros(layer.last_num_tokens, layer.num_experts, dtype=torch.bool)
    mask[pair_token, pair_expert] = True
    return mask


def test_a_bf16_layer_routes_as_fp32_on_the_same_weights():
    """Router, top-C and the predictor's target in fp32: a bf16 layer takes the decisions an fp32 layer with
    the same (bf16-representable) weights and input takes. A bf16 softmax over 4096 nearly uniform scores
    would tie most of them and pick other tokens."""
    bf16_layer = moe_layer().to(BF16)
    fp32_layer = copy.deepcopy(bf16_layer).float()
    x = torch.randn(8, 512, 64, generator=torch.Generator().manual_seed(2)).to(BF16)
    _, bf16_losses = bf16_layer(x)
    _, fp32_losses = fp32_layer(x.float())
    # Away from ties: each expert's C-th and (C+1)-th fp32 scores differ; in bf16 they would be equal.
    scores = torch.nn.functional.linear(x.float().reshape(-1, 64), fp32_layer.router.weight).softmax(-1)
    top = scores.topk(512 + 1, dim=0).values  # C = 4096 / 8 tokens per expert
    assert (top[-2] > top[-1]).all() and (top[-2].to(BF16) == top[-1].to(BF16)).all()
    assert torch.equal(routing_mask(bf16_layer), routing_mask(fp32_layer))
    assert bf16_losses["predictor"].dtype == torch.float32
    torch.testing.assert_close(bf16_losses["predictor"], fp32_losses["predictor"], rtol=1e-5, atol=0)
    assert torch.bfloat16 not in {bf16_layer.pending_quantile.dtype, bf16_layer.thresholds.dtype}


def test_thresholds_stay_fp32_through_casts_and_keep_their_values():
    layer = moe_layer()
    layer.thresholds.fill_(0.123456789)
    layer.to(BF16)
    assert layer.thresholds.dtype == torch.float32 and layer.thresholds[0].item() == pytest.approx(0.123456789, rel=1e-7)
    assert layer.router.weight.dtype == BF16
    layer.update_thresholds(torch.full((8,), 0.5))
    assert layer.thresholds[0].item() == pytest.approx(0.95 * 0.123456789 + 0.05 * 0.5, rel=1e-7)
    layer.double()
    assert layer.thresholds.dtype == torch.float64  # wider than fp32 is kept


def test_the_combine_accumulates_in_fp32_and_rounds_once():
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(16, 32, generator=generator).to(BF16)
    experts = 8
    scores = torch.rand(16, experts, generator=generator).softmax(-1)
    pair_token = torch.arange(16).repeat_interleave(experts)  # every expert took every token
    gate_index = torch.arange(16 * experts)
    expert_out = torch.randn(16 * experts, 32, generator=generator).to(BF16)
    out = weighted_sum(tokens, scores, gate_index, token_order(pair_token, 16), expert_out)
    exact = (scores.double().reshape(-1, 1) * expert_out.double()).reshape(16, experts, 32).sum(1)
    assert out.dtype == BF16 and torch.equal(out, exact.to(BF16))
    bf16_sum = torch.zeros_like(tokens).index_add_(0, pair_token, scores.to(BF16).reshape(-1, 1) * expert_out)
    assert not torch.equal(bf16_sum, exact.to(BF16))  # what accumulating in bf16 would have given


def test_wide_linear_computes_in_fp32_and_keeps_only_its_bf16_inputs():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, 16, generator=generator).to(BF16).requires_grad_()
    weight = torch.randn(3, 16, generator=generator).to(BF16).requires_grad_()
    bias = torch.randn(3, generator=generator).to(BF16).requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = wide_linear(x, weight, bias)
    assert out.dtype == torch.float32 and all(t.dtype == BF16 for t in kept) and len(kept) == 2
    upstream = torch.randn(out.shape, generator=generator)
    (out * upstream).sum().backward()
    reference = [t.detach().float().requires_grad_() for t in (x, weight, bias)]
    expected = torch.nn.functional.linear(*reference)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for mine, theirs in zip((x, weight, bias), reference):
        assert mine.grad.dtype == BF16 and torch.equal(mine.grad, theirs.grad.to(BF16))


def test_tf32_switch():
    try:
        enable_tf32(True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        enable_tf32(False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        enable_tf32(False)


def test_reduced_precision_without_zero_is_refused_naming_the_way_out():
    from diffmoe_scale.config import ConfigError

    with pytest.raises(ConfigError, match="parallel.zero_stage: train.precision=bf16 keeps fp32 master weights"):
        load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", ["train.precision=bf16"])


# --------------------------------------------------------------------------------------------
# The trainer: bf16 follows fp32.


def losses_of(runtime, tmp_path, config_file: str, precision: str) -> list[float]:
    from diffmoe_scale.train.trainer import Trainer

    out = tmp_path / precision
    config = load_config(REPO / config_file, [
        "train.max_steps=20", "logging.every_steps=1", "train.global_batch_size=32", f"train.out_dir={out}",
        f"train.precision={precision}", "parallel.zero_stage=1", "checkpoint.every_steps=0", "sample.steps=1",
        "sample.per_class=1", *NARROW])
    assert Trainer(config, runtime).train() == 0
    return [record["loss"] for record in read_metrics(out)]


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["configs/digits_diffmoe_e4_flow.yaml", "configs/digits_diffmoe_e4_ddpm.yaml"],
                         ids=["flow", "ddpm"])
def test_bf16_training_follows_fp32_over_twenty_steps(runtime, tmp_path, config_file):
    """The same 20 steps (same data, draws and initial weights) in fp32 and in bf16, on the narrow model. The bound: bf16 keeps 8
    significant bits, so each matmul's output is off by ~0.4% relative; over 20 steps of lr <= 2e-4 (warmup)
    the weights drift apart by about that much times the steps' updates, which moves a loss of ~1 by a few
    percent at most. Per step: within 5% (the loss itself differs step to step by 10-30% here); over the
    last 10 steps on average within 2%. (That training learns: tests/test_train.py.)"""
    fp32 = losses_of(runtime, tmp_path, config_file, "fp32")
    bf16 = losses_of(runtime, tmp_path, config_file, "bf16")
    assert len(fp32) == len(bf16) == 20
    worst = max(abs(b - f) / f for b, f in zip(bf16, fp32))
    assert worst < 0.05, f"largest per-step difference {worst:.2%}"
    assert sum(bf16[-10:]) / 10 == pytest.approx(sum(fp32[-10:]) / 10, rel=0.02)


def test_the_gpus_segment_sum_adds_as_the_cpus_index_add_and_gradients_flow_back_as_gathers():
    """The combine sums each token's pairs in expert order: on a GPU as one segment per token (no atomics),
    on a CPU with index_add; both make the same additions in the same order, so the same bits."""
    from diffmoe_scale.models.pair_rows import gather_pairs, segment_sum, sum_by_token

    generator = torch.Generator().manual_seed(5)
    tokens, experts, per_expert = 40, 16, 30  # about 12 pairs per token: bf16 sums would round
    pair_token = torch.cat([torch.randperm(tokens - 4, generator=generator)[:per_expert].sort().values
                            for _ in range(experts)])  # most tokens in several experts, the last 4 in none
    order = token_order(pair_token, tokens)
    rows = torch.randn(len(pair_token), 8, generator=generator, dtype=torch.float64).float()
    assert torch.equal(segment_sum(rows, order), sum_by_token(rows, order))
    untouched = torch.ones(tokens, dtype=torch.bool).index_fill_(0, pair_token, False)
    assert untouched.any() and (sum_by_token(rows, order)[untouched] == 0).all()
    x = torch.randn(tokens, 8, generator=generator).to(BF16).requires_grad_()
    upstream = torch.randn(len(pair_token), 8, generator=generator).to(BF16)
    gather_pairs(x, order).backward(upstream)
    exact = torch.zeros(tokens, 8, dtype=torch.float64).index_add_(0, pair_token, upstream.double())
    assert torch.equal(x.grad, exact.to(BF16))  # summed in fp32, rounded once
