"""diffmoe_scale: training DiffMoE diffusion transformers at cluster scale."""
__version__ = "0.1.0"
