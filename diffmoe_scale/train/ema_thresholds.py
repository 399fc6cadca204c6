"""Which DiffMoE thresholds the EMA model samples with (`sample.thresholds`).

The EMA averages the weights; the thresholds tau are running statistics of the trained model's
capacity predictor. Three choices for the EMA model:
- "copy": the trained model's tau at the step the EMA was taken;
- "average": tau averaged with the weights' decay, as the DiffMoE authors' EMA averages every buffer
  (it then lags the trained tau by about 1 / (1 - decay) steps);
- "calibrate": tau measured on the EMA weights themselves (calibration.py).
The EMA keeps both the copy and the average (train/ema.py); whole-model dicts (consolidated
checkpoints, exported EMA files) hold the average of buffer `name` under `averaged_name(name)`.
"""
import torch

from ..config import ConfigError


def averaged_name(name: str) -> str:
    """The key of buffer `name`'s average in whole-model dicts."""
    return f"{name}.average"


def whole_buffers(ema_state: dict) -> dict[str, torch.Tensor]:
    """The buffers of a `ShardedEMA.state_dict` and their averages, keyed as whole-model dicts key them."""
    averages = ema_state.get("buffer_averages", {})  # none in checkpoints of older versions
    return {**ema_state["buffers"], **{averaged_name(name): tensor for name, tensor in averages.items()}}


def buffers_to_fill(mode: str) -> str:
    """What `ShardedEMA.fill` puts in the buffers for a threshold mode (calibration starts from the copy)."""
    return "average" if mode == "average" else "copy"


def load_ema_weights(model, weights: dict[str, torch.Tensor], mode: str) -> None:
    """Load a whole-model EMA dict into `model` (built by `build_model`) with the buffers of `mode`."""
    names = set(model.state_dict()) - {name for name, _ in model.named_parameters()}  # persistent buffers
    averages = {averaged_name(name) for name in names}
    if buffers_to_fill(mode) == "average":
        missing = sorted(name for name in averages if name not in weights)
        if missing:
            raise ConfigError(f"these EMA weights hold no averaged thresholds ({missing[0]}: written before the "
                              f"EMA kept them); sample with copied or calibrated thresholds")
        weights = {**weights, **{name: weights[averaged_name(name)] for name in names}}
    model.load_state_dict({name: tensor for name, tensor in weights.items() if name not in averages})
