"""Which run a resumed run is. Resumed in its own checkpoint directory, it is the same run: the checkpoint's
run id (its W&B run continues) and lineage. Started by `--resume PATH` from a checkpoint outside it (another
run's, copied or moved), it is a branch: a new run id, with the source run recorded as `branched_from` in
every manifest it writes and in its W&B config."""
from pathlib import Path


def resumed_identity(checkpoint: Path, manifest: dict, checkpoint_dir: Path,
                     new_run_id: str) -> tuple[str, dict | None]:
    """(run id, branched_from) of a run that resumes `checkpoint` (with its `manifest`) and saves into
    `checkpoint_dir`; `new_run_id` is the id a branch takes."""
    if checkpoint_dir.resolve() in checkpoint.resolve().parents:
        return manifest["run_id"], manifest.get("branched_from")
    return new_run_id, {"run_id": manifest["run_id"], "checkpoint": str(checkpoint.resolve()), "step": manifest["step"]}
