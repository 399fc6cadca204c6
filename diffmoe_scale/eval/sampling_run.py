"""A sampling run over all ranks: token pools dealt to the expert-parallel groups, each rank's samples written
to its own shard as it goes, a stop request honoured after the current batch, and a rerun continuing where
the last one stopped (the files: eval/sample_shards.py)."""
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..parallel.collectives import all_gather_objects, barrier, broadcast_object, max_over_ranks
from ..train.faults import inject as inject_fault
from .sample_shards import (SHARD, check_manifest, complete_pools, expected_labels, list_shards, shard_name,
                            shard_problem, write_shard)


@dataclass
class Layout:
    """Where this rank stands in a sampling run: its EP group among `groups` and its place in the group."""

    rank: int
    world_size: int
    groups: int  # EP groups: each samples whole token pools
    group: int
    ep_size: int
    ep_rank: int
    writer: bool  # writes its samples (tensor-parallel ranks after the first hold the same ones)

    @classmethod
    def of(cls, runtime, parallel) -> "Layout":
        return cls(rank=runtime.rank, world_size=runtime.world_size, groups=parallel.dp_size // parallel.ep_size,
                   group=parallel.dp_rank // parallel.ep_size, ep_size=parallel.ep_size, ep_rank=parallel.ep_rank,
                   writer=runtime.rank % parallel.tp_size == 0)

    def rows(self, pool: int, batch_size: int) -> tuple[int, int]:
        """(first sample, count) of this rank's rows of `pool`."""
        share = batch_size // self.ep_size
        return pool * batch_size + self.ep_rank * share, share


def complete_pools_on_disk(directory: Path, identity: dict, num_samples: int, batch_size: int, num_classes: int,
                           layout: Layout) -> set[int]:
    """The token pools already complete in `directory` (collective). Every rank reads its part of the shards
    through; rank 0 then deletes damaged shards, those of incomplete pools and torn temporary files."""
    is_main = layout.rank == 0
    problem = broadcast_object(check_manifest(directory, identity) if is_main else None)
    if problem:
        raise ConfigError(f"{problem}: give another --out, or delete it to start over")
    names = broadcast_object(list_shards(directory) if is_main else None)
    mine = names[layout.rank::layout.world_size]
    checked = {name: shard_problem(directory / name, num_classes) for name in mine}
    problems = {name: problem for part in all_gather_objects(checked) for name, problem in part.items()}
    good = [tuple(map(int, SHARD.fullmatch(name).groups())) for name, problem in problems.items() if problem is None]
    done, incomplete = complete_pools(good, num_samples, batch_size)
    if is_main:
        for name, problem in problems.items():
            if problem:
                print(f"{directory / name}: {problem}; sampling it again", flush=True)
                (directory / name).unlink()
        for start, stop in incomplete:
            (directory / shard_name(start, stop)).unlink()
        for torn in directory.glob("*.tmp"):
            torn.unlink()
    barrier()
    return done


def sample_pools(sampler, directory: Path, identity: dict, num_samples: int, batch_size: int, seed: int,
                 layout: Layout, stop, device) -> int:
    """Samples 0..num_samples-1 into shards in `directory` (collective); returns 0 when all are there, else the
    stop request's exit code. `sampler.rows(start, count, seed)` samples this rank's rows of a pool."""
    num_classes = sampler.config.model.num_classes
    num_pools = math.ceil(num_samples / batch_size)
    done = complete_pools_on_disk(directory, identity, num_samples, batch_size, num_classes, layout)
    todo = [pool for pool in range(num_pools) if pool not in done]
    mine = todo[layout.group::layout.groups]
    rounds = math.ceil(len(todo) / layout.groups)
    written = num_samples - sum(min(batch_size, num_samples - pool * batch_size) for pool in todo)
    if layout.rank == 0:
        print(f"{directory}: {written}/{num_samples} samples there already; {len(todo)} token pools of {batch_size} "
              f"to sample over {layout.groups} EP group(s) of {layout.ep_size}", flush=True)
    began, at_start = time.perf_counter(), written
    for round_ in range(rounds):
        stop.announce()
        code = max_over_ranks(stop.exit_code, device)  # every rank stops after the same round
        if code:
            return code
        if round_ < len(mine):
            pool = mine[round_]
            start, count = layout.rows(pool, batch_size)
            images, c_avgs = sampler.rows(start, count, seed)
            kept = max(0, min(count, num_samples - start))  # samples past num_samples only filled the pool
            if layout.writer and kept:
                write_shard(directory, start, images[:kept], expected_labels(start, start + kept, num_classes), c_avgs)
            inject_fault("pool", pool, layout.rank)
        finished = todo[round_ * layout.groups:(round_ + 1) * layout.groups]
        written += sum(min(batch_size, num_samples - pool * batch_size) for pool in finished)
        if layout.rank == 0:
            rate = (written - at_start) / (time.perf_counter() - began)
            eta = f"{(num_samples - written) / rate / 60:.1f} min" if rate else "unknown"
            print(f"sampled {written}/{num_samples} ({rate:.1f} images/s, ETA {eta})", flush=True)
    barrier()  # every rank's last shard is written before rank 0 merges them
    return 0
