"""Weights & Biases logging on rank 0: one W&B run per training run, continued under the same id
(the checkpoint's run id) when the run resumes in its directory; a branch (see run_identity.py) is a
new W&B run whose config names its source run under `branched_from`."""
from pathlib import Path

from ..config import Config


def flatten(record: dict) -> dict:
    """W&B wants scalars: the per-layer per-expert capacity table becomes capacity/layer<l>/expert<e>."""
    flat = {key: value for key, value in record.items() if key != "capacity"}
    for layer, experts in enumerate(record.get("capacity", [])):
        for expert, value in enumerate(experts):
            flat[f"capacity/layer{layer}/expert{expert}"] = value
    return flat


class WandbRun:
    def __init__(self, config: Config, run_id: str, out_dir: Path, branched_from: dict | None = None):
        import wandb

        logging = config.logging
        recorded = {**config.to_dict(), **({"branched_from": branched_from} if branched_from else {})}
        self.run = wandb.init(project=logging.wandb_project, entity=logging.wandb_entity, id=run_id, resume="allow",
                              dir=str(out_dir), mode=logging.wandb_mode, name=out_dir.name, config=recorded)

    def log(self, record: dict) -> None:
        self.run.log(flatten(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()
