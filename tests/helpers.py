"""What several test files need to start runs in subprocesses and read their outputs."""
import json
import os
from pathlib import Path

# The tiny ImageFolder of conftest.py: class names, and the size of each class's images.
CLASSES = ["cat", "dog", "owl"]
SIZES = [(20, 30), (48, 36), (33, 33), (70, 40)]  # odd, wide, tall, large


def clean_env() -> dict:
    """This environment without rendezvous or launcher variables (the in-process tests set some)."""
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items()
            if k not in launcher_vars and not k.startswith(("SLURM_", "OMPI_", "PMI"))}


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
