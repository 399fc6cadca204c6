"""Metrics: one JSON object per logged step in metrics.jsonl, and a progress line on stdout."""
import json
import os
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def efficiency(record: dict) -> str:
    """" | 1.23 TFLOP/s/dev, MFU 41.0%" (MFU where the device's peak is known)."""
    if "tflops_per_device" not in record:
        return ""
    mfu = f", MFU {record['mfu']:.1%}" if record.get("mfu") is not None else ""
    return f" | {record['tflops_per_device']:.3g} TFLOP/s/dev{mfu}"


def cut_metrics_after(path: Path, step: int, block: int = 1 << 16) -> tuple[int, int]:
    """Drop the lines after the last record of a step <= `step` (written by a run that died before its
    next checkpoint), so a resumed run's file reads as one straight run. Returns (records dropped,
    damaged lines dropped: torn, not JSON, not an object, or without a step).

    The file is read backwards from its end only as far as the cut, and cut by one truncate: a kill at
    any moment leaves it either whole or cut, and the work is proportional to what is cut."""
    if not path.exists():
        return 0, 0
    dropped = damaged = 0
    with open(path, "r+b") as file:
        end = file.seek(0, os.SEEK_END)
        cut = end
        for start, line in _lines_backwards(file, end, block):
            if start == end:
                continue  # the empty remainder after the file's final newline
            record_step = _step_of(line)
            if record_step is not None and record_step <= step:
                break
            cut = start
            dropped, damaged = (dropped + 1, damaged) if record_step is not None else (dropped, damaged + 1)
        if cut < end:
            file.truncate(cut)
            os.fsync(file.fileno())
    return dropped, damaged


def _lines_backwards(file, end: int, block: int):
    """(offset, line without its newline) of the file's lines from the last to the first, reading
    `block` bytes at a time from the end."""
    position, head = end, b""  # head: the bytes from `position` to the first newline after it
    while position > 0:
        size = min(block, position)
        position -= size
        file.seek(position)
        lines = (file.read(size) + head).split(b"\n")
        head, offset = lines[0], position + len(lines[0])
        complete = []
        for line in lines[1:]:
            complete.append((offset + 1, line))
            offset += 1 + len(line)
        yield from reversed(complete)
    yield 0, head


def _step_of(line: bytes) -> int | None:
    """The step of a metrics record, or None for a damaged line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class MetricsLog:
    """Records to metrics.jsonl (and to W&B when given a run), with a progress line, on rank 0."""

    def __init__(self, path: Path, max_steps: int, enabled: bool, start_step: int = 0, wandb_run=None):
        self.path = path
        self.wandb_run = wandb_run
        self.max_steps = max_steps
        self.enabled = enabled
        self.start = time.perf_counter()
        self.start_step = start_step
        self.file = open(path, "a") if enabled else None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run:
            self.wandb_run.log(record)
        step = record["step"]
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step - self.start_step, 1) * (self.max_steps - step)
        extras = "".join(f" | {k} {record[k]:.4f}" for k in ("predictor_loss", "balance_loss", "vb_loss") if k in record)
        print(
            f"step {step}/{self.max_steps} | loss {record['loss']:.4f}{extras} | c_avg {record['c_avg']:.2f}"
            f" | {record['images_per_s']:.0f} img/s{efficiency(record)} | elapsed {format_duration(elapsed)}"
            f" | eta {format_duration(eta)}",
            flush=True,
        )

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb_run:
            self.wandb_run.close()
