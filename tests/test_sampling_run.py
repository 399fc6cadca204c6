"""The sampling run's files, in process with a stand-in sampler: one token pool of samples in memory at a time,
a stop signal honoured after the current batch with exit status 75, a rerun that reads every shard through,
redoes damaged and torn ones and writes the same bytes as a run never stopped; the merge holds one shard at a
time. (Real models over 1 and 2 ranks: tests/test_sample.py.)"""
import signal
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from diffmoe_scale.config import ConfigError, SampleConfig, load_config
from diffmoe_scale.eval.sample_shards import complete_pools, expected_labels, merge_shards, write_shard
from diffmoe_scale.eval.sampling_run import Layout, sample_pools
from diffmoe_scale.train.stop import EXIT_PREEMPTED, StopRequest

REPO = Path(__file__).resolve().parents[1]
ONE_RANK = Layout(rank=0, world_size=1, groups=1, group=0, ep_size=1, ep_rank=0, writer=True)
SETTINGS = {"weights": "w", "seed": 3, "batch_size": 8}


class StandInSampler:
    """Pixels that depend only on the seed and the sample index; records the rows asked for."""

    def __init__(self, num_classes=10, size=6):
        self.config = load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", [f"model.num_classes={num_classes}"])
        self.size, self.calls = size, []

    def rows(self, start: int, count: int, seed: int):
        self.calls.append((start, count))
        images = np.stack([np.random.default_rng([seed, i]).integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
                           for i in range(start, start + count)])
        return images, [1.0 + start / 1000]


def run(directory: Path, sampler, num_samples=44, batch_size=8, settings=SETTINGS) -> int:
    stop = StopRequest(unit="batch")
    try:
        return sample_pools(sampler, directory, settings, num_samples, batch_size, 3, ONE_RANK, stop, "cpu")
    finally:
        stop.restore()


def test_a_stopped_and_damaged_run_continues_to_the_same_bytes(tmp_path, monkeypatch, capsys):
    straight = StandInSampler()
    assert run(tmp_path / "straight", straight) == 0
    assert straight.calls == [(start, 8) for start in range(0, 48, 8)]  # one pool at a time; the last one whole
    merge_shards(tmp_path / "straight", 44, tmp_path / "straight.npz")
    assert "sampled 44/44" in capsys.readouterr().out

    monkeypatch.setenv("DIFFMOE_FAULT", "sigusr1@pool:2")  # the signal arrives while pool 2 is written
    stopped = StandInSampler()
    assert run(tmp_path / "resumed", stopped) == EXIT_PREEMPTED
    assert stopped.calls == [(0, 8), (8, 8), (16, 8)]  # pool 2 finished, nothing after it
    assert "SIGUSR1: saving and stopping at the end of this batch" in capsys.readouterr().out
    monkeypatch.delenv("DIFFMOE_FAULT")
    damaged = tmp_path / "resumed" / "samples_00000008_00000016.npz"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # a shard cut short
    (tmp_path / "resumed" / "samples_00000024_00000032.npz.tmp").write_bytes(b"torn")  # a write killed midway
    resumed = StandInSampler()
    assert run(tmp_path / "resumed", resumed) == 0
    assert resumed.calls == [(8, 8), (24, 8), (32, 8), (40, 8)]
    output = capsys.readouterr().out
    assert "samples_00000008_00000016.npz: unreadable" in output and "16/44 samples there already" in output
    assert not list((tmp_path / "resumed").glob("*.tmp"))
    merge_shards(tmp_path / "resumed", 44, tmp_path / "resumed.npz")
    assert (tmp_path / "resumed.npz").read_bytes() == (tmp_path / "straight.npz").read_bytes()
    with np.load(tmp_path / "resumed.npz") as merged:
        assert merged["arr_0"].shape == (44, 6, 6, 3) and merged["arr_1"].tolist() == [i % 10 for i in range(44)]
        assert np.array_equal(merged["arr_0"][17], StandInSampler().rows(17, 1, 3)[0][0])


def test_other_settings_in_the_same_directory_are_refused_naming_them(tmp_path):
    assert run(tmp_path, StandInSampler(), num_samples=8) == 0
    with pytest.raises(ConfigError, match=r"other settings \(batch_size: 8 -> 4; seed: 3 -> 4\)"):
        run(tmp_path, StandInSampler(), num_samples=8, settings={**SETTINGS, "seed": 4, "batch_size": 4})


def test_more_samples_extend_fewer_and_a_shard_torn_between_ranks_is_redone(tmp_path):
    assert run(tmp_path, StandInSampler(), num_samples=12) == 0  # pools [0, 8) and [8, 12) of [8, 16)
    assert complete_pools([(0, 8), (8, 12)], 12, 8) == ({0, 1}, [])
    assert complete_pools([(0, 8), (8, 12)], 20, 8) == ({0}, [(8, 12)])
    assert complete_pools([(0, 4), (8, 16)], 16, 8) == ({1}, [(0, 4)])  # rank 1 of pool 0 never wrote
    assert complete_pools([(4, 8), (8, 16)], 16, 8) == ({1}, [(4, 8)])  # rank 0 of pool 0 never wrote
    more = StandInSampler()
    assert run(tmp_path, more, num_samples=20) == 0
    assert more.calls == [(8, 8), (16, 8)]
    merge_shards(tmp_path, 20, tmp_path / "more.npz")
    again = StandInSampler()
    assert run(tmp_path / "again", again, num_samples=20) == 0
    merge_shards(tmp_path / "again", 20, tmp_path / "again.npz")
    assert (tmp_path / "more.npz").read_bytes() == (tmp_path / "again.npz").read_bytes()


def merge_peak(directory: Path, shards: int, per_shard: int = 64, shape=(32, 32, 3)) -> int:
    """Peak traced memory (numpy's arrays included) of merging `shards` shards of random images."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    for k in range(shards):
        write_shard(directory, k * per_shard, rng.integers(0, 256, (per_shard, *shape), dtype=np.uint8),
                    expected_labels(k * per_shard, (k + 1) * per_shard, 1000), [1.0])
    tracemalloc.start()
    kept, c_avg = merge_shards(directory, shards * per_shard, directory / "merged.npz", keep={5, 300})
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    with np.load(directory / "merged.npz") as merged:
        assert merged["arr_0"].shape == (shards * per_shard, *shape) and c_avg == 1.0
        assert np.array_equal(merged["arr_0"][300], kept[300])
    return peak


def test_the_merge_holds_one_shard_in_memory_whatever_their_number(tmp_path):
    shard_bytes = 64 * 32 * 32 * 3
    few, many = merge_peak(tmp_path / "few", 6), merge_peak(tmp_path / "many", 24)
    print(f"merge peak: 6 shards {few / shard_bytes:.2f}, 24 shards {many / shard_bytes:.2f} shard sizes")
    assert many < 1.2 * few and many < 6 * shard_bytes  # np.load of a zip member takes ~3.3x its array at peak


def test_stop_request_from_a_real_signal_is_honoured_after_the_batch(tmp_path):
    class SignalOnFirstBatch(StandInSampler):
        def rows(self, start, count, seed):
            if not self.calls:
                signal.raise_signal(signal.SIGTERM)
            return super().rows(start, count, seed)

    sampler = SignalOnFirstBatch()
    assert run(tmp_path, sampler) == EXIT_PREEMPTED
    assert sampler.calls == [(0, 8)] and [p.name for p in tmp_path.glob("samples_*")] == ["samples_00000000_00000008.npz"]


def test_sample_config_keys_are_validated():
    with pytest.raises(ConfigError, match="sample.every_steps"):
        load_config(REPO / "configs/digits_diffmoe_e4_flow.yaml", ["sample.every_steps=-1"])
    assert SampleConfig().every_steps == 0 and SampleConfig().precision == "auto"


def test_every_rank_has_written_its_last_shard_before_the_run_returns(tmp_path, monkeypatch):
    """Rank 0 merges the shards once sample_pools returns: the last collective must follow the last write
    (without it, a rank still writing its half of the last pool left rank 0 a shard short)."""
    from diffmoe_scale.eval import sampling_run

    events = []
    write = sampling_run.write_shard
    monkeypatch.setattr(sampling_run, "write_shard", lambda *args: (events.append("write"), write(*args))[1])
    monkeypatch.setattr(sampling_run, "barrier", lambda: events.append("collective"))
    monkeypatch.setattr(sampling_run, "max_over_ranks", lambda value, device: (events.append("collective"), value)[1])
    assert run(tmp_path, StandInSampler(), num_samples=24) == 0
    assert events.count("write") == 3 and events[-1] == "collective"
