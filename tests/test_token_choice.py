"""Token choice (TC-DiT) against a per-token loop reference, its balance loss and capacity statistics,
and which DiT blocks get which FFN. float64 and continuous random inputs: no ties."""
import math

import pytest
import torch

from diffmoe_scale.config import load_config
from diffmoe_scale.models import DiffMoELayer, FeedForward, TokenChoiceLayer, build_model
from tests.layer_inputs import DIGITS_CONFIG, DIM, HIDDEN, expert_params, random_input


# --------------------------------------------------------------------------------------------
# Token choice (TC-DiT)


def make_token_choice(num_experts, top_k, capacity_factor, seed=0):
    torch.manual_seed(seed)
    layer = TokenChoiceLayer(DIM, HIDDEN, num_experts, top_k=top_k, capacity_factor=capacity_factor)
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    return layer.double().train()


def reference_token_choice(layer, tokens, top_k, capacity_factor):
    scores = layer.router(tokens).softmax(dim=-1)
    num_tokens, num_experts = scores.shape
    assigned = {e: [] for e in range(num_experts)}
    for n in range(num_tokens):
        row = scores[n].tolist()
        for e in sorted(range(num_experts), key=lambda e: -row[e])[:top_k]:
            assigned[e].append(n)
    counts_before = torch.tensor([len(assigned[e]) for e in range(num_experts)], dtype=torch.float64)
    balance = (num_experts * counts_before / (num_tokens * top_k) * scores.mean(dim=0)).sum()
    kept = {}
    limit = math.ceil(capacity_factor * top_k * num_tokens / num_experts) if capacity_factor > 0 else num_tokens
    for e in range(num_experts):
        kept[e] = sorted(assigned[e], key=lambda n: -scores[n, e].item())[:limit]
    out = torch.zeros_like(tokens)
    for e in range(num_experts):
        if kept[e]:
            idx = torch.tensor(kept[e])
            out = out.index_add(0, idx, scores[idx, e, None] * layer.experts.expert(e, tokens[idx]))
    dropped = sum(len(assigned[e]) - len(kept[e]) for e in range(num_experts))
    return out, balance, [len(kept[e]) for e in range(num_experts)], dropped


@pytest.mark.parametrize("num_experts,top_k,capacity_factor,expect_drops",
                         [(4, 2, 0.0, False), (4, 1, 0.0, False), (8, 2, 0.0, False),
                          (4, 2, 0.6, True), (4, 1, 0.5, True), (3, 2, 1.0, True)])
def test_token_choice_matches_per_token_reference(num_experts, top_k, capacity_factor, expect_drops):
    layer = make_token_choice(num_experts, top_k, capacity_factor)
    x = random_input(4, 10)  # N = 40
    out, losses = layer(x)
    tokens = x.reshape(-1, DIM)
    ref_out, ref_balance, ref_counts, dropped = reference_token_choice(layer, tokens, top_k, capacity_factor)
    assert (dropped > 0) == expect_drops
    torch.testing.assert_close(out.reshape(-1, DIM), ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses["balance"], ref_balance, rtol=1e-10, atol=1e-12)
    assert layer.last_tokens_per_expert.tolist() == ref_counts

    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    wrt = expert_params(layer) + [x]
    grads = torch.autograd.grad((out * upstream).sum(), wrt, retain_graph=True)
    ref_grads = torch.autograd.grad((ref_out * upstream.reshape(-1, DIM)).sum(), wrt, retain_graph=True)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The balance loss trains the router (through P_e; f_e counts are not differentiable).
    got = torch.autograd.grad(losses["balance"], layer.router.weight)[0]
    want = torch.autograd.grad(ref_balance, layer.router.weight)[0]
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    layer.eval()
    eval_out, eval_losses = layer(x)
    assert eval_losses == {}
    torch.testing.assert_close(eval_out, out, rtol=0, atol=0)


def test_token_choice_balance_loss_is_one_when_uniform():
    # Perfectly uniform scores: f_e = 1 and P_e = 1/E for every expert -> sum_e f_e P_e = 1.
    layer = make_token_choice(4, 4, 0.0)
    with torch.no_grad():
        layer.router.weight.zero_()
    _, losses = layer(random_input(2, 5))
    torch.testing.assert_close(losses["balance"], torch.tensor(1.0, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# Which blocks are MoE


@pytest.mark.parametrize("ffn,interleave,moe_blocks,kind", [
    ("dense", True, [], None),
    ("dense", False, [], None),
    ("diffmoe", True, [1, 3, 5], DiffMoELayer),
    ("diffmoe", False, [0, 1, 2, 3, 4, 5], DiffMoELayer),
    ("token_choice", True, [1, 3, 5], TokenChoiceLayer),
    ("expert_choice", False, [0, 1, 2, 3, 4, 5], DiffMoELayer),
])
def test_moe_block_placement(ffn, interleave, moe_blocks, kind):
    config = load_config(DIGITS_CONFIG, [f"moe.ffn={ffn}", f"moe.interleave={str(interleave).lower()}"])
    model = build_model(config)
    assert len(model.blocks) == 6
    for i, block in enumerate(model.blocks):
        if i in moe_blocks:
            assert isinstance(block.ffn, kind), (i, type(block.ffn))
        else:
            assert isinstance(block.ffn, FeedForward), (i, type(block.ffn))
    moe_ids = {id(layer) for layer in model.moe_layers()}
    assert [i for i, block in enumerate(model.blocks) if id(block.ffn) in moe_ids] == moe_blocks
    if ffn == "expert_choice":
        assert all(layer.pool == "sample" and layer.predictor is None for layer in model.moe_layers())
    if ffn == "diffmoe":
        assert all(layer.pool == "ep_group" and layer.predictor is not None for layer in model.moe_layers())
        # The router starts at N(0, 0.006^2), as the authors' gate.
        router_std = torch.cat([layer.router.weight.flatten() for layer in model.moe_layers()]).std().item()
        assert 0.004 < router_std < 0.008
    # Dense model: no aux losses at all.
    _, losses = model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    if ffn == "dense":
        assert losses == {}


def test_capacity_by_condition_counts_experts_per_token_by_noise_and_class():
    from diffmoe_scale.train.capacity import CapacityByCondition

    config = load_config("configs/digits_token_choice_e4_flow.yaml", ["moe.top_k=2", "moe.capacity_factor=0"])
    model = build_model(config).train()
    images, labels = torch.randn(6, 1, 8, 8), torch.tensor([0, 0, 3, 3, 3, 9])
    noise_level = torch.tensor([0.05, 0.15, 0.15, 0.95, 1.0, 0.5])
    model(images, 1 - noise_level, labels)
    capacity = CapacityByCondition(num_classes=10)
    capacity.add(model, noise_level, labels)
    taken = capacity.take()
    # Top-2 without a capacity limit: every token takes exactly two experts.
    assert taken["capacity_by_noise"] == [2.0, 2.0, None, None, None, 2.0, None, None, None, 2.0]
    assert taken["capacity_by_class"] == [2.0, None, None, 2.0, None, None, None, None, None, 2.0]
    assert capacity.take()["capacity_by_noise"] == [None] * 10  # a new window
