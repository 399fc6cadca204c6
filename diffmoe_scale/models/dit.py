"""Diffusion transformer (DiT) with adaLN-Zero blocks whose FFN is any of our FFN kinds.

Plain PyTorch: knows nothing of ranks or launchers. `forward` returns the prediction and a dict of
auxiliary losses summed over layers (unweighted; the objective weights them).
"""
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .experts import RoutedFFN
from .routing_tape import RoutingTape, saved_routing_contexts


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid_size**2, dim] (half the channels per axis)."""
    def embed_1d(positions, channels):
        freqs = 1.0 / 10000 ** (torch.arange(channels // 2, dtype=torch.float64) / (channels / 2))
        angles = positions[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([embed_1d(cols.reshape(-1), dim // 2), embed_1d(rows.reshape(-1), dim // 2)], dim=1)
    return emb.float()


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        frequencies = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, -1))


class DiTBlock(nn.Module):
    checkpoint = False  # recompute this block in backward (activation checkpointing)

    def __init__(self, dim: int, num_heads: int, ffn: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = ffn
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        if self.checkpoint and torch.is_grad_enabled():
            # Eager: a tape per call, the recomputation replays the routing of this forward. Compiled: the
            # backward graph keeps the routing ops' outputs (see routing_tape).
            contexts = saved_routing_contexts if torch.compiler.is_compiling() else RoutingTape().contexts
            return torch.utils.checkpoint.checkpoint(self._forward, x, c, use_reentrant=False, context_fn=contexts)
        return self._forward(x, c)

    def _forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        ffn_out, losses = self.ffn(modulate(self.norm2(x), shift_ffn, scale_ffn))
        return x + gate_ffn.unsqueeze(1) * ffn_out, losses


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """DiT over [B, C, H, W] latents. `make_ffn(block_index)` builds each block's FFN."""

    def __init__(self, *, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                 num_heads: int, num_classes: int, learn_sigma: bool, make_ffn: Callable[[int], nn.Module]):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes  # label num_classes is the null (unconditional) class
        grid = input_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, make_ffn(i)) for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for module in self.moe_layers():
            module.reset_router()
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def moe_layers(self) -> list[RoutedFFN]:
        return [module for module in self.blocks.modules() if isinstance(module, RoutedFFN)]

    def unpatchify(self, x):
        batch, tokens, _ = x.shape
        p, grid, channels = self.patch_size, math.isqrt(tokens), self.out_channels
        x = x.view(batch, grid, grid, p, p, channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid * p, grid * p)

    def forward(self, x, t, y):
        """x: [B, C, H, W]; t: [B] timesteps; y: [B] labels (num_classes = null).

        Returns (prediction [B, out_channels, H, W], {loss name: sum over layers}).
        """
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        aux_losses = {}
        for block in self.blocks:
            x, losses = block(x, c)
            for name, value in losses.items():
                aux_losses[name] = aux_losses.get(name, 0.0) + value
        return self.unpatchify(self.final_layer(x, c)), aux_losses
