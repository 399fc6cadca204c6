"""Classifier-free guidance around a model that returns (prediction, aux_losses)."""
import torch

from ..models.pools import separate_pools


def guided_prediction(model, x, t, y, cfg_scale: float):
    """The model's prediction with guidance on the first C (mean) channels.

    With cfg_scale != 1 the batch is doubled with null labels (label index = model.num_classes) and run
    as one forward in which each half is its own token pool: batch-dependent MoE routing then routes each
    half exactly as a forward of that half alone would (as the DiffMoE authors' flow sampler runs them:
    two forwards). Extra output channels (a learned variance) are taken from the conditional half.
    """
    if cfg_scale == 1.0:
        return model(x, t, y)[0]
    null = torch.full_like(y, model.num_classes)
    with separate_pools(model, 2):
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))[0]
    cond, uncond = out.chunk(2)
    channels = x.shape[1]
    guided = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)
