"""DiffMoE thresholds measured on a model's own capacity predictor (`sample.thresholds: calibrate`).

Training tracks each threshold tau_e as an EMA of q_e, the C-th largest predictor probability of
expert e in a training pool (models/diffmoe.py). The EMA model's weights are not the trained model's,
so neither its copied nor its averaged tau need fit its own predictor. Calibration runs the EMA model
as training runs the trained one, without gradients, on `sample.calibration_batches` training-like
batches (the training data, label dropout, noise and timesteps drawn as in training, micro-batches of
the config's size on this layout, routed by top-C), and sets tau_e to the mean of its q_e over those
pools and over all ranks. Threshold routing then takes about C tokens per expert and pool on such
inputs: inference C_avg close to the training capacity.
"""
import torch

from ..config import Config
from ..data import ShuffledBatchSampler
from ..diffusion import build_objective
from ..parallel.collectives import average_over_ranks
from ..parallel.expert_parallel import predictor_layers, take_pending_quantiles
from ..parallel.groups import ParallelGroups
from .batches import dropped_labels, rank_batch

# Draws of their own: not those of any training step.
CALIBRATION_SEED = 0x7A_0CA1


@torch.no_grad()
def calibrate_thresholds(model, config: Config, groups: ParallelGroups, device, dataset) -> None:
    """Set the thresholds of every predictor layer of `model` (collective over every rank; see the module
    docstring). `model` is built and parallelized for `config` on `groups`; its train/eval mode is kept."""
    layers = predictor_layers(model)
    if not layers:
        return
    objective = build_objective(config)
    batches, accum = config.sample.calibration_batches, config.train.grad_accum_steps
    sampler = ShuffledBatchSampler(len(dataset), config.train.global_batch_size, CALIBRATION_SEED, groups.dp_rank,
                                   groups.dp_size)
    was_training, total = model.training, 0
    model.train()  # top-C routing and the threshold quantile, as in training
    try:
        for _ in range(batches):
            images, labels, draws = rank_batch(config, dataset, objective, sampler, groups.dp_rank, device,
                                               CALIBRATION_SEED)
            conditioning = dropped_labels(labels, draws["drop"], config.model.num_classes)
            micro = len(images) // accum
            for i in range(accum):
                rows = slice(i * micro, (i + 1) * micro)
                objective.training_losses(model, images[rows], conditioning[rows], draws["noise"][rows],
                                          draws["t"][rows])
                total = total + take_pending_quantiles(model)
    finally:
        model.train(was_training)
    for layer, tau in zip(layers, average_over_ranks(total / (batches * accum)), strict=True):
        layer.thresholds.copy_(tau)
