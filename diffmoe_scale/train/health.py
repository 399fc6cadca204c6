"""NaN/Inf health of training steps: found here, on every rank at once, and the step skipped.

A step is unhealthy when any rank's loss or the global gradient norm is not finite. Without ZeRO in
fp32 we compute the norm ourselves (see `clip_grad_norm_`) and skip by dropping the gradients before
the optimizer runs, so torch's AdamW leaves every parameter and its state as they are. ZeRO 1/2 and bf16
keep the gradients in DeepSpeed's partitions, where DeepSpeed's optimizers compute the same global norm
and skip the update (weights, moments and Adam's step) when it is not finite; we check its report
(`was_step_applied`) against our own finding and stop with an error if they disagree, so a DeepSpeed
that applied a poisoned step would not go unnoticed. tests/test_health.py pins DeepSpeed's skip in
every precision and ZeRO stage.
"""
import math

import torch
import torch.distributed as dist

from ..config import Config
from ..parallel.engine import clip_grad_norm_, clips_in_engine
from ..parallel.groups import ParallelGroups


def nonfinite_losses(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many of this micro-batch's loss terms are NaN/Inf (on the device: no host sync)."""
    return sum((~torch.isfinite(value.detach())).sum() for value in losses.values())


class StepHealth:
    """Counts skipped steps and streaks; `decide` and `outcome` bracket the optimizer step."""

    def __init__(self, config: Config, engine, model, groups: ParallelGroups):
        self.config, self.engine, self.model, self.groups = config, engine, model, groups
        self.own_norm = not clips_in_engine(config)
        self.skipped_steps = 0
        self.in_a_row = 0
        self._losses_finite = True
        self._grad_norm = None

    def decide(self, nonfinite_count: torch.Tensor) -> None:
        """At the last micro-batch of a step, before `engine.step()` (collective): find whether the step is
        healthy; without ZeRO in fp32, clip or drop the gradients accordingly."""
        flag = nonfinite_count.float().reshape(1)
        if self.own_norm:
            norm = clip_grad_norm_(self.model, self.config.optim.grad_clip, self.groups)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        # The step's one host read: whether to skip must be known before the optimizer runs.
        values = torch.cat([flag, norm.reshape(1).float()]).tolist() if self.own_norm else flag.tolist()
        self._losses_finite = values[0] == 0
        if self.own_norm:
            self._grad_norm = values[1]
        if self.own_norm and not self.healthy(self._grad_norm):
            self.model.zero_grad(set_to_none=True)  # AdamW then leaves every parameter and its state alone

    def healthy(self, grad_norm: float) -> bool:
        return self._losses_finite and math.isfinite(grad_norm)

    def outcome(self) -> tuple[bool, float]:
        """After `engine.step()`: (whether the update was applied, the gradient norm before clipping)."""
        if self.own_norm:
            grad_norm = self._grad_norm
            applied = self.healthy(grad_norm)
        else:
            grad_norm = float(self.engine.get_global_grad_norm())
            applied = self.engine.was_step_applied()
            if applied and not self.healthy(grad_norm):
                raise RuntimeError(f"DeepSpeed applied an optimizer step although the step was unhealthy (losses "
                                   f"finite: {self._losses_finite}, gradient norm {grad_norm}); the weights are "
                                   f"no longer trustworthy: resume from the last checkpoint")
        if applied:
            self.in_a_row = 0
        else:
            self.skipped_steps += 1
            self.in_a_row += 1
        return applied, grad_norm

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "nonfinite_in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps, self.in_a_row = state["skipped_steps"], state["nonfinite_in_a_row"]
