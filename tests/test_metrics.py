"""metrics.jsonl on resume: cut back to the resumed step in place, reading only what is cut; damaged
lines are dropped and counted."""
import json
from pathlib import Path

from diffmoe_scale.train.metrics import cut_metrics_after


def record(step: int) -> bytes:
    return (json.dumps({"step": step, "loss": 1.0 / step}) + "\n").encode()


def bytes_read_by_this_process() -> int:
    """Linux's count of bytes this process has read through read() and similar calls."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(io["rchar"])


def test_cut_drops_later_records_and_damaged_lines_and_keeps_the_rest(tmp_path):
    path = tmp_path / "metrics.jsonl"
    kept = b"".join(record(step) for step in range(1, 9))
    damaged = [b"not json\n", b"[1, 2]\n", b'{"loss": 0.5}\n', b'{"step": "9"}\n', b"\n", b'{"step": 12, "lo']
    path.write_bytes(kept + record(9) + damaged[0] + record(10) + b"".join(damaged[1:5]) + record(11) + damaged[5])
    inode = path.stat().st_ino
    assert cut_metrics_after(path, 8) == (3, 6)
    assert path.read_bytes() == kept
    assert path.stat().st_ino == inode  # cut in place, not rewritten into a new file
    assert cut_metrics_after(path, 8) == (0, 0)
    assert cut_metrics_after(tmp_path / "absent.jsonl", 8) == (0, 0)


def test_cut_reads_what_it_cuts_not_the_whole_file(tmp_path):
    # 256 MiB of history (a hole, so the test writes little) followed by the records of steps 1..2000.
    path = tmp_path / "metrics.jsonl"
    history = 256 * 2**20
    tail = b"\n" + b"".join(record(step) for step in range(1, 2001))
    with open(path, "wb") as file:
        file.seek(history)
        file.write(tail)
    cut_from = tail.index(record(1901))
    before = bytes_read_by_this_process()
    assert cut_metrics_after(path, 1900, block=4096) == (100, 0)
    read = bytes_read_by_this_process() - before
    assert path.stat().st_size == history + cut_from
    assert read < 4 * (len(tail) - cut_from) + 2 * 4096, f"read {read} bytes to cut {len(tail) - cut_from}"
