"""Model construction from a Config."""
from ..config import Config
from .diffmoe import DiffMoELayer
from .dit import DiT
from .experts import FeedForward, RoutedFFN
from .token_choice import TokenChoiceLayer

__all__ = ["DiT", "DiffMoELayer", "FeedForward", "RoutedFFN", "TokenChoiceLayer", "build_model", "is_moe_block"]


def is_moe_block(config: Config, block_index: int) -> bool:
    if config.moe.ffn == "dense":
        return False
    return block_index % 2 == 1 if config.moe.interleave else True


def build_model(config: Config) -> DiT:
    model_cfg, moe = config.model, config.moe
    dim = model_cfg.hidden_size
    hidden_dim = model_cfg.ffn_width

    def make_ffn(block_index: int):
        if not is_moe_block(config, block_index):
            return FeedForward(dim, hidden_dim)
        if moe.ffn == "token_choice":
            return TokenChoiceLayer(dim, hidden_dim, moe.num_experts, moe.top_k, moe.capacity_factor, moe.shared_expert)
        return DiffMoELayer(
            dim, hidden_dim, moe.num_experts, capacity=moe.capacity, pool=moe.pool,
            use_predictor=moe.ffn == "diffmoe", threshold_ema=moe.threshold_ema,
            inference_routing=moe.inference_routing, shared_expert=moe.shared_expert,
        )

    return DiT(
        input_size=model_cfg.input_size, patch_size=model_cfg.patch_size, in_channels=model_cfg.in_channels,
        hidden_size=dim, depth=model_cfg.depth, num_heads=model_cfg.num_heads, num_classes=model_cfg.num_classes,
        learn_sigma=model_cfg.learn_sigma, make_ffn=make_ffn,
    )
