"""Diffusion objectives: training losses and samplers."""
from ..config import Config
from .ddpm import DDPMObjective, GaussianSchedule
from .flow import FlowObjective
from .guidance import guided_prediction

__all__ = ["DDPMObjective", "FlowObjective", "GaussianSchedule", "build_objective", "guided_prediction"]


def build_objective(config: Config):
    diffusion = config.diffusion
    if diffusion.objective == "flow":
        return FlowObjective()
    return DDPMObjective(diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end, config.model.learn_sigma)
