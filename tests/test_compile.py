"""Compiled blocks (train.compile): one graph per block in a training step, the eager results, and sampling.

In process, on a tiny DiT. The compiler here is dynamo's capture, AOT autograd and inductor's partitioner
(which decides what the backward recomputes under activation checkpointing), without inductor's code
generation (a minute per block on 2 CPU cores); the one inductor test is marked slow.
"""
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from diffmoe_scale.config import load_config
from diffmoe_scale.diffusion import build_objective
from diffmoe_scale.models import build_model
from diffmoe_scale.parallel import compile as compile_module
from diffmoe_scale.parallel.compile import compile_blocks
from diffmoe_scale.parallel.parallelize import apply_activation_checkpointing

TINY = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "moe.num_experts=4",
        "train.global_batch_size=8"]  # block 0 dense, block 1 DiffMoE: 8 x 16 tokens, 32 per expert


class Graphs:
    """A torch.compile backend: AOT autograd with inductor's partitioner (min-cut recomputation), running the
    forward and backward graphs as traced (no code generation) and keeping them."""

    def __init__(self):
        self.forward, self.backward = [], []
        self.backend = aot_autograd(fw_compiler=self._keep(self.forward), bw_compiler=self._keep(self.backward),
                                    partition_fn=min_cut_rematerialization_partition)

    @staticmethod
    def _keep(graphs):
        def compiler(graph, example_inputs):
            graphs.append(graph)
            return graph.forward
        return compiler


@pytest.fixture
def graphs(monkeypatch):
    torch._dynamo.reset()
    kept = Graphs()
    monkeypatch.setattr(compile_module, "OPTIONS", {"backend": kept.backend, "fullgraph": True})
    yield kept
    torch._dynamo.reset()


def ops(graph) -> set[str]:
    return {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}


def tiny_model(compiled: bool, checkpointing: bool = True, overrides=()):
    config = load_config("configs/digits_diffmoe_e4_flow.yaml", [*TINY, *overrides])
    torch.manual_seed(0)
    model = build_model(config)
    for name, param in model.named_parameters():  # away from adaLN-Zero's identity blocks: every weight gets a gradient
        if "adaLN_modulation" in name or "final_layer" in name:
            torch.nn.init.normal_(param, std=0.05)
    if checkpointing:
        apply_activation_checkpointing(model, 1)
    if compiled:
        compile_blocks(model)
    return config, model


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(8, 1, 8, 8, generator=generator), torch.rand(8, generator=generator),
            torch.randint(0, 10, (8,), generator=generator), torch.randn(8, 1, 8, 8, generator=generator))


def training_step(config, model):
    """One forward and backward: (losses, gradients, threshold quantiles, capacity per expert)."""
    x, t, y, noise = batch()
    losses = build_objective(config).training_losses(model, x, y, noise, t)
    (losses["diffusion"] + losses["predictor"]).backward()
    layer = model.moe_layers()[0]
    grads = {name: param.grad for name, param in model.named_parameters()}
    return ({name: value.detach() for name, value in losses.items()}, grads, layer.pending_quantile,
            layer.capacity_per_expert())


def test_a_training_step_compiles_each_block_into_one_graph_and_inference_keeps_routing_eager(graphs):
    config, model = tiny_model(compiled=True)
    training_step(config, model)  # fullgraph=True: a graph break inside a block would raise
    assert len(graphs.forward) == len(graphs.backward) == 2  # the dense block's and the MoE block's
    x, t, y, _ = batch()
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.Unsupported):
        model.eval()(x, t, y)  # the threshold routing's data-dependent counts break the MoE block (by design)


def test_checkpointed_backward_recomputes_the_block_but_not_its_routing(graphs):
    training_step(*tiny_model(compiled=True))
    routing = {"aten.topk.default", "aten.sort.default", "aten.sort.stable"}
    forward_ops, backward_ops = set().union(*map(ops, graphs.forward)), set().union(*map(ops, graphs.backward))
    assert routing & forward_ops
    assert "aten.baddbmm.default" in backward_ops  # the experts' first matmul, recomputed
    assert not routing & backward_ops


def test_compiled_step_with_checkpointing_equals_eager(graphs):
    """Same losses and gradients (fp32), the routing kept by the recomputation, side effects once."""
    config, eager = tiny_model(compiled=False)
    ours = training_step(*tiny_model(compiled=True))
    ref = training_step(config, eager)
    assert graphs.backward
    for name in ref[0]:
        torch.testing.assert_close(ours[0][name], ref[0][name], rtol=1e-6, atol=0)
    for name in ref[1]:
        torch.testing.assert_close(ours[1][name], ref[1][name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(ours[2], ref[2], rtol=0, atol=0)  # the threshold quantile, recorded once
    torch.testing.assert_close(ours[3], ref[3], rtol=0, atol=0)


def test_compiled_sampling_equals_eager(graphs, monkeypatch):
    """Inference: threshold routing (eager inside the compiled blocks) with classifier-free guidance's pools."""
    monkeypatch.setitem(compile_module.OPTIONS, "fullgraph", False)  # the MoE FFN's eager routing breaks its block
    outputs = []
    for compiled in (False, True):
        config, model = tiny_model(compiled=compiled, checkpointing=False)
        model.eval().requires_grad_(False)
        for layer in model.moe_layers():
            layer.thresholds.fill_(0.5)  # experts take different counts
        noise, y = batch()[3], batch()[2]
        with torch.no_grad():
            outputs.append(build_objective(config).sample(model, noise, y, steps=3, sampler="euler", cfg_scale=2.0))
    assert graphs.forward
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inductor_step_equals_eager(monkeypatch):
    """torch.compile's default compiler, as training uses it: within float reassociation of fp32. One MoE
    block (inductor's code generation takes about a minute per graph here)."""
    torch._dynamo.reset()
    one_block = ["model.depth=1", "moe.interleave=false"]
    config, eager = tiny_model(compiled=False, overrides=one_block)
    ours, ref = training_step(*tiny_model(compiled=True, overrides=one_block)), training_step(config, eager)
    torch._dynamo.reset()
    for name in ref[0]:
        torch.testing.assert_close(ours[0][name], ref[0][name], rtol=1e-5, atol=1e-6)
    for name in ref[1]:
        torch.testing.assert_close(ours[1][name], ref[1][name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-5, atol=1e-6)


def test_a_forward_every_block_shares_gets_graphs_up_to_dynamos_recompile_limit(monkeypatch):
    """compile_blocks raises dynamo's private `recompile_limit`: the blocks share one forward, one code object,
    and past that many graphs dynamo runs the rest of them eagerly, without an error."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    class Block(torch.nn.Module):
        def __init__(self, kind: str):
            super().__init__()
            self.kind = kind  # a constant each graph is specialised on, as a block's kind of FFN

        def forward(self, x):
            return x * len(self.kind)

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 3)
    for kind in ("a", "bb", "ccc", "dddd", "eeeee"):
        block = Block(kind)
        assert torch.equal(torch.compile(block.forward, backend=backend)(torch.ones(2)), torch.full((2,), len(kind)))
    torch._dynamo.reset()
    assert len(graphs) == 3
    compile_blocks(SimpleNamespace(moe_layers=list, blocks=[]))  # a model without blocks: only the settings
    assert torch._dynamo.config.recompile_limit == compile_module.RECOMPILE_LIMIT
