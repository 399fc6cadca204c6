"""Deterministic shuffled batches that every rank can slice and a checkpoint can resume.

Epoch e is the permutation drawn from seed + e; the global batch of step s is the next
`global_batch_size` indices of the epoch sequence (batches never straddle epochs: the tail that
does not fill a batch is skipped). Rank r of R takes rows [r * B/R, (r + 1) * B/R) of it.
"""
import torch


class ShuffledBatchSampler:
    def __init__(self, dataset_size: int, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} does not split over {world_size} ranks")
        if global_batch_size > dataset_size:
            raise ValueError(f"global batch {global_batch_size} exceeds the dataset size {dataset_size}")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = dataset_size // global_batch_size
        self.step = 0  # batches handed out so far: the whole resumable position
        self._epoch_permutation = (-1, None)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch_permutation[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch_permutation = (epoch, torch.randperm(self.dataset_size, generator=generator))
        return self._epoch_permutation[1]

    def next_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's dataset indices for the next step, and per-index flip bits."""
        epoch, offset = divmod(self.step, self.batches_per_epoch)
        start = offset * self.global_batch_size
        global_batch = self._permutation(epoch)[start : start + self.global_batch_size]
        flip_generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        flips = torch.rand(self.global_batch_size, generator=flip_generator) < 0.5
        per_rank = self.global_batch_size // self.world_size
        rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        self.step += 1
        return global_batch[rows], flips[rows]

    def state_dict(self) -> dict:
        """The position, and what decides the sequence it is a position in."""
        return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "dataset_size": self.dataset_size}

    def load_state_dict(self, state: dict) -> dict[str, tuple]:
        """Restores the position; returns {name: (saved, now)} for each of the seed, the global batch and the
        dataset size that differs from the state's (any of them changes which images a step draws). States
        written before the dataset size was recorded cannot tell a change of it."""
        self.step = state["step"]
        return {name: (state[name], getattr(self, name)) for name in ("seed", "global_batch_size", "dataset_size")
                if name in state and state[name] != getattr(self, name)}
