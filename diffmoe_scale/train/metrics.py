"""Metrics: one JSON object per logged step in metrics.jsonl, and a progress line on stdout."""
import json
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the records after `step` (written by a run that died before its next checkpoint), so a
    resumed run's file reads as one straight run."""
    if not path.exists():
        return
    records = [_parse(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in records if r is not None and r["step"] <= step))


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:
        return None  # a line torn by a crash


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
            f" | {record['images_per_s']:.0f} img/s | elapsed {format_duration(elapsed)} | eta {format_duration(eta)}",
            flush=True,
        )

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb_run:
            self.wandb_run.close()
