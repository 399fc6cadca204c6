"""Checkpoint files: atomic publication, verification, retention and the choice of what to resume.

<checkpoint dir>/
  step_00001000/               a sharded checkpoint (a DeepSpeed tag): DeepSpeed's model, per-expert
                               and optimizer files, trainer_rank_<r>.pt per rank, and manifest.json
  step_00001000_consolidated/  the same state as whole tensors (launch/checkpoint.py consolidate),
                               which any parallel layout can resume from
  latest                       the name of the newest published checkpoint

A checkpoint counts only once its manifest.json exists and every file it lists has the recorded
size and SHA-256: the manifest is written last, after every rank has finished writing and the files
have been read back. `publish`, `verify`, `find_resumable` and `digest_files` are collective (every
rank calls them); `prune` is rank 0's alone.
"""
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy
import torch
import torch.distributed as dist

from ..config import ConfigError
from ..parallel.collectives import all_gather_objects, barrier, broadcast_object

MANIFEST = "manifest.json"
CONSOLIDATED_FILE = "consolidated.pt"
SHARDED = "sharded"
CONSOLIDATED = "consolidated"
_NAME = re.compile(r"step_(\d+)(_consolidated)?$")

# Config keys that decide the parameters' shapes or meaning: a checkpoint cannot continue with others.
_MODEL_DEFINING = ("model.", "moe.ffn", "moe.num_experts", "moe.interleave", "moe.shared_expert",
                   "diffusion.objective")
_FREE_MODEL_KEYS = ("model.class_dropout",)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def consolidated_twin(checkpoint: Path) -> Path:
    """Where `launch/checkpoint.py consolidate` writes a sharded checkpoint's consolidated copy."""
    return checkpoint.with_name(checkpoint.name + "_consolidated")


def rank_state_name(rank: int) -> str:
    return f"trainer_rank_{rank:05d}.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _is_main() -> bool:
    return _rank() == 0


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file and rename it, so `path` is always either old or whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda file: file.write(text.encode()))


def atomic_torch_save(obj, path: Path) -> None:
    _atomic_write(path, lambda file: torch.save(obj, file))


def file_digest(path: Path) -> list:
    """[size, sha256] of a file as the file system gives it back (flushed to disk first)."""
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        os.fsync(file.fileno())
        while chunk := file.read(1 << 24):
            sha.update(chunk)
    return [path.stat().st_size, sha.hexdigest()]


def digest_files(directory: Path, names: list[str]) -> dict[str, list | None]:
    """name -> [size, sha256] (None when missing); the reading is split over the ranks."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = {name: file_digest(directory / name) if (directory / name).is_file() else None
            for name in names[_rank()::world]}
    return {name: digest for part in all_gather_objects(mine) for name, digest in part.items()}


def read_manifest(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def publish(checkpoint: Path, meta: dict) -> dict:
    """Read back every file of a written checkpoint and write its manifest: from then on it counts.
    Returns the manifest."""
    names = broadcast_object(sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
                             if _is_main() else None)
    manifest = {**meta, "files": digest_files(checkpoint, names)}
    if _is_main():
        atomic_write_text(checkpoint / MANIFEST, json.dumps(manifest, indent=1))
    barrier()
    return manifest


def verify(checkpoint: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) when the checkpoint is complete and intact, else (None, what is wrong)."""
    manifest = broadcast_object(read_manifest(checkpoint) if _is_main() else None)
    if manifest is None:
        return None, "no readable manifest.json (its save did not finish)"
    expected = manifest["files"]
    actual = digest_files(checkpoint, sorted(expected))
    wrong = [name for name in sorted(expected) if actual[name] != expected[name]]
    if not wrong:
        return manifest, None
    name = wrong[0]
    found = "missing" if actual[name] is None else f"{actual[name][0]} bytes, sha256 {actual[name][1][:12]}"
    return None, (f"{len(wrong)} file(s) differ from its manifest, e.g. {name}: {found}, "
                  f"expected {expected[name][0]} bytes, sha256 {expected[name][1][:12]}")


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, newest step first; at one step the sharded one first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), bool(m.group(2)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, _, p in sorted(found, key=lambda item: (-item[0], item[1]))]


def prune(root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete sharded checkpoints outside the retention rule (the newest `keep_last` complete ones,
    and every one whose step is a multiple of `keep_every`); returns what it deleted."""
    complete = [p for p in list_checkpoints(root) if _NAME.match(p.name).group(2) is None and (p / MANIFEST).exists()]
    keep = set(complete[:keep_last])
    if keep_every:
        keep |= {p for p in complete if int(_NAME.match(p.name).group(1)) % keep_every == 0}
    deleted = [p for p in complete if p not in keep]
    for path in deleted:
        (path / MANIFEST).unlink()  # first, so a half-deleted checkpoint never looks complete
        shutil.rmtree(path)
    return deleted


def find_resumable(root: Path, layout: dict) -> tuple[Path, dict] | None:
    """The newest intact checkpoint this layout can resume from, skipping damaged ones with a warning.

    A sharded checkpoint resumes only into the parallel layout that wrote it; when the newest intact
    one has another layout and no consolidated twin, that is an error naming the way out."""
    candidates = broadcast_object(list_checkpoints(root) if _is_main() else None)
    for path in candidates:
        manifest, problem = verify(path)
        if problem:
            if _is_main():
                print(f"warning: skipping checkpoint {path}: {problem}", flush=True)
            continue
        if manifest["kind"] == CONSOLIDATED or manifest["layout"] == layout:
            return path, manifest
        if consolidated_twin(path) not in candidates:
            raise ConfigError(layout_mismatch(path, manifest["layout"], layout))
    return None


def layout_mismatch(path: Path, saved: dict, current: dict) -> str:
    return (f"checkpoint {path} was written by the layout {describe_layout(saved)} and this run is "
            f"{describe_layout(current)}; a sharded checkpoint resumes only into its own layout. Consolidate it "
            f"(python launch/checkpoint.py consolidate {path}) and this run resumes from the consolidated copy")


def describe_layout(layout: dict) -> str:
    return (f"{layout['world_size']} ranks (tp {layout['tp']}, ep {layout['ep']}), ZeRO {layout['zero_stage']}, "
            f"{layout['precision']}")


def flatten(config: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(changes that cannot resume, changes that can) between a checkpoint's config and this run's,
    each as "key: old -> new"."""
    old, new = flatten(saved), flatten(current)
    blocking, allowed = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        change = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        defining = key.startswith(_MODEL_DEFINING) and key not in _FREE_MODEL_KEYS
        (blocking if defining else allowed).append(change)
    return blocking, allowed


def code_version() -> str:
    """The git commit of this source tree (with "-dirty" when it has local changes), or "unknown"."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def plain_name(name: str) -> str:
    """A parameter's name in the model as `build_model` makes it (without the DeepSpeed MoE wrapper)."""
    return name.replace("deepspeed_moe.", "")


def read_ema_weights(path: Path) -> tuple[dict, dict[str, torch.Tensor], int]:
    """(config, EMA weights named as in `build_model`'s model, step) from a safetensors file written by
    `launch/checkpoint.py export-ema` or from a consolidated checkpoint."""
    from safetensors import SafetensorError, safe_open

    if path.is_file():
        try:
            with safe_open(str(path), "pt") as file:
                metadata = file.metadata() or {}
                if "config" not in metadata or "step" not in metadata:
                    raise ValueError(f"{path}: no config and step in its metadata (not written by "
                                     f"launch/checkpoint.py export-ema)")
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except SafetensorError as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
        return json.loads(metadata["config"]), tensors, int(metadata["step"])
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    manifest = read_manifest(path)
    if manifest is None:
        raise ValueError(f"{path}: neither an exported EMA file nor a checkpoint with a manifest")
    if manifest["kind"] != CONSOLIDATED:
        raise ValueError(f"{path} is a sharded checkpoint: export its EMA weights first "
                         f"(python launch/checkpoint.py export-ema {path} --out ema.safetensors)")
    ema = torch.load(path / CONSOLIDATED_FILE, weights_only=False)["ema"]
    return manifest["config"], {plain_name(name): tensor for name, tensor in ema.items()}, manifest["step"]


def capture_rng() -> dict:
    """This process's global random number generators (the trainer's own generator is saved apart)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
