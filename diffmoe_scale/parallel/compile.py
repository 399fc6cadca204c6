"""torch.compile of the DiT blocks, one compiled forward per block (as torchtitan does), from outside the model.

Training's expert choice gives every expert exactly k tokens per pool: a block's forward and backward are
one graph each, activation checkpointing included (the compiler recomputes in backward, keeping the
routing: see models/routing_tape.py). What has data-dependent sizes stays eager inside a compiled block:

- inference's threshold routing (and token choice), whose per-expert counts come from the data: the MoE
  FFN runs eagerly, the rest of the block (attention, modulation, dense FFNs) compiled;
- the expert-parallel MoE FFN: its all-gather, its host-read all-to-all splits (which change every step)
  and its all-to-alls stay eager; the block breaks into a graph before and one after it. Under activation
  checkpointing torch.compile then checkpoints such a block eagerly around its compiled parts, and the
  recomputation routes again from the same inputs through the same kernels (one more all-gather of the
  pool's scores per MoE layer), keeping the top-k outputs as above.
"""
import torch

from ..models import RoutedFFN

RECOMPILE_LIMIT = 64
OPTIONS = {"backend": "inductor"}  # torch.compile's arguments (tests use a faster backend, and fullgraph)


def _eager_unless_static(layer: RoutedFFN) -> None:
    """The layer's forward is traced into its block's graph when its routing has static shapes on one
    process's pool; otherwise it runs eagerly (a graph break in the block)."""
    traced, eager = layer.forward, torch.compiler.disable(layer.forward)

    def forward(x):
        return traced(x) if layer.dispatch.size == 1 and layer.static_routing() else eager(x)

    layer.forward = forward


def compile_blocks(model) -> None:
    """Compile every block of `model` (in place; after the other parallelisms and checkpointing are applied)."""
    # Side effects of a checkpointed forward (threshold quantiles, capacity statistics) happen once, in the
    # forward, as the eager tape has it; the backward graph's recomputation has none.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    # Every block shares one forward (one code object): dense and MoE blocks, training and sampling, with and
    # without the EMA copy each need a graph of their own; past dynamo's default of 8 the rest would run eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for layer in model.moe_layers():
        _eager_unless_static(layer)
    for block in model.blocks:
        _compile_forward(block)


def _compile_forward(block) -> None:
    compiled = torch.compile(block.forward, **OPTIONS)

    def forward(x, c):
        # Inductor (torch 2.13, CPU) returned wrong input gradients for a block given a transposed input (the
        # first block's: the patch embedding's transpose), its forward right; a contiguous copy avoids it.
        return compiled(x.contiguous(), c.contiguous())

    block.forward = forward
