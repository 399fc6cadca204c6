"""Checkpoint files: atomic publication, verification, retention and the choice of what to resume.

<checkpoint dir>/
  step_00001000/               a sharded checkpoint (a DeepSpeed tag): DeepSpeed's model, per-expert
                               and optimizer files, trainer_rank_<r>.pt per rank, and manifest.json
  step_00001000_consolidated/  the same state as whole tensors (launch/checkpoint.py consolidate),
                               which any parallel layout can resume from: weights.pt, exp_avg.pt,
                               exp_avg_sq.pt, ema.pt, state.pt
  latest                       the name of the newest published checkpoint

A checkpoint counts only once its manifest.json exists and every file it lists has the recorded
size and SHA-256: the manifest is written last, after every rank has finished writing and the files
have been read back. `publish`, `verify`, `find_resumable` and `digest_files` are collective (every
rank calls them); `prune` and `make_room_for` are rank 0's alone. Nothing here deletes a directory it
cannot read: what it cannot judge is set aside (renamed), never removed.
"""
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy
import torch
import torch.distributed as dist

from ..config import ConfigError
from ..parallel.collectives import all_gather_objects, barrier, broadcast_object

MANIFEST = "manifest.json"
# A consolidated checkpoint: <part>.pt for each part, written one at a time (train/consolidation.py).
CONSOLIDATED_PARTS = ("weights", "exp_avg", "exp_avg_sq", "ema", "state")
SHARDED = "sharded"
CONSOLIDATED = "consolidated"
_NAME = re.compile(r"step_(\d+)(_consolidated)?$")


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
    """Write through a temporary file and rename it, so `path` is always either old or whole; a write that
    fails (a full disk) leaves no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def _digest_or_problem(path: Path) -> list | str | None:
    """`file_digest`, None when the file is missing, or why it cannot be read (permission, I/O)."""
    try:
        return file_digest(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        return err.strerror or str(err)


def digest_files(directory: Path, names: list[str]) -> dict[str, list | str | None]:
    """name -> [size, sha256], None when missing, or a string saying why it cannot be read; the reading
    is split over the ranks."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = {name: _digest_or_problem(directory / name) for name in names[_rank()::world]}
    return {name: digest for part in all_gather_objects(mine) for name, digest in part.items()}


NO_MANIFEST = "no manifest.json (its save did not finish)"
_MANIFEST_KEYS = {"kind": str, "step": int, "run_id": str, "code_version": str, "saved_at": str, "layout": dict,
                  "config": dict, "files": dict}


def _malformed(manifest) -> str | None:
    """What makes a parsed manifest unusable, or None."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            return f"no {key!r}" if key not in manifest else f"{key!r} is not a {kind.__name__}"
    if manifest["kind"] not in (SHARDED, CONSOLIDATED):
        return f"unknown kind {manifest['kind']!r}"
    missing = {"world_size", "tp", "ep", "zero_stage", "precision"} - manifest["layout"].keys()
    if missing:
        return f"'layout' has no {', '.join(sorted(missing))}"
    if not all(isinstance(manifest["config"].get(section), dict) for section in ("model", "moe")) or not all(
            isinstance(section, dict) for section in manifest["config"].values()):
        return "'config' is not a config's sections (model, moe, ...)"
    for name, digest in manifest["files"].items():
        if not (isinstance(digest, list) and len(digest) == 2 and isinstance(digest[0], int)
                and isinstance(digest[1], str)):
            return f"the entry of {name} in 'files' is not [size, sha256]"
    return None


def read_manifest(checkpoint: Path) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, why there is no usable one: missing, unreadable, malformed)."""
    try:
        with open(checkpoint / MANIFEST, "rb") as file:
            manifest = json.loads(file.read())
    except FileNotFoundError:
        return None, NO_MANIFEST
    except OSError as err:
        return None, f"manifest.json unreadable ({err.strerror or err})"
    except ValueError as err:
        return None, f"manifest.json is not JSON ({err})"
    problem = _malformed(manifest)
    return (None, f"manifest.json is malformed: {problem}") if problem else (manifest, None)


def publish(checkpoint: Path, meta: dict) -> dict:
    """Read back every file of a written checkpoint and write its manifest: from then on it counts.
    Returns the manifest; an OSError when a file cannot be read back."""
    names = broadcast_object(sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
                             if _is_main() else None)
    files = digest_files(checkpoint, names)
    unreadable = {name: digest for name, digest in files.items() if not isinstance(digest, list)}
    if unreadable:
        name, problem = next(iter(unreadable.items()))
        raise OSError(f"{checkpoint / name}: cannot read it back ({problem or 'missing'})")
    manifest = {**meta, "files": files}
    if _is_main():
        atomic_write_text(checkpoint / MANIFEST, json.dumps(manifest, indent=1))
    barrier()
    return manifest


def verify(checkpoint: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) when the checkpoint is complete and intact, else (None, what is wrong)."""
    manifest, problem = broadcast_object(read_manifest(checkpoint) if _is_main() else None)
    if problem:
        return None, problem
    expected = manifest["files"]
    actual = digest_files(checkpoint, sorted(expected))
    unreadable = [name for name in sorted(expected) if isinstance(actual[name], str)]
    if unreadable:
        return None, f"{len(unreadable)} file(s) unreadable, e.g. {unreadable[0]}: {actual[unreadable[0]]}"
    wrong = [name for name in sorted(expected) if actual[name] != expected[name]]
    if not wrong:
        return manifest, None
    name = wrong[0]
    found = "missing" if actual[name] is None else f"{actual[name][0]} bytes, sha256 {actual[name][1][:12]}"
    return None, (f"{len(wrong)} file(s) differ from its manifest, e.g. {name}: {found}, "
                  f"expected {expected[name][0]} bytes, sha256 {expected[name][1][:12]}")


def is_checkpoint(path: Path) -> bool:
    """Whether `path` names one checkpoint (rather than a directory of them), readable or not."""
    return bool(_NAME.match(path.name)) or os.path.lexists(path / MANIFEST)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, newest step first; at one step the sharded one first.
    A ConfigError when `root` cannot be listed."""
    try:
        found = [(int(m.group(1)), bool(m.group(2)), p) for p in root.iterdir()
                 if (m := _NAME.match(p.name)) and p.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as err:
        raise ConfigError(f"{root}: cannot list its checkpoints ({err.strerror or err})") from err
    return [p for _, _, p in sorted(found, key=lambda item: (-item[0], item[1]))]


def newest_complete(root: Path) -> tuple[Path, dict] | None:
    """The newest sharded checkpoint with a usable manifest (its files are not read) and that manifest."""
    for path in list_checkpoints(root):
        manifest, problem = read_manifest(path)
        if not problem and manifest["kind"] == SHARDED:
            return path, manifest
    return None


def _step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def prune(root: Path, keep_last: int, keep_every: int, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Delete sharded checkpoints outside the retention rule (the newest `keep_last` complete ones, every
    one whose step is a multiple of `keep_every`, and those in `keep`) with their complete consolidated
    copies, and unfinished saves (no manifest) of steps before the newest complete checkpoint; returns what
    it deleted. Only checkpoints whose manifest reads back, or that certainly have none, are candidates:
    what cannot be read is never deleted. Rank 0 calls it only between saves, so an unfinished sharded save
    older than a complete one is dead; an unfinished consolidated copy is left, since
    `launch/checkpoint.py consolidate` may be writing it."""
    sharded = [p for p in list_checkpoints(root) if _NAME.match(p.name).group(2) is None]
    problems = {p: read_manifest(p)[1] for p in sharded}
    complete = [p for p in sharded if problems[p] is None]
    kept = set(complete[:keep_last]) | set(keep)
    if keep_every:
        kept |= {p for p in complete if _step(p) % keep_every == 0}
    unfinished = [p for p in sharded if complete and problems[p] == NO_MANIFEST and _step(p) < _step(complete[0])]
    twins = [consolidated_twin(p) for p in complete if p not in kept]
    deleted = []
    for path in [p for p in complete if p not in kept] + [t for t in twins if read_manifest(t)[1] is None]:
        try:
            (path / MANIFEST).unlink()  # first, so a half-deleted checkpoint never looks complete
            deleted.append(path)
            shutil.rmtree(path)
        except OSError as err:
            print(f"warning: retention could not delete {path}: {err}", flush=True)
    for path in unfinished:
        try:
            shutil.rmtree(path)
            deleted.append(path)
        except OSError as err:
            print(f"warning: retention could not delete the unfinished save {path}: {err}", flush=True)
    return deleted


def set_aside(path: Path) -> Path:
    """Rename `path` to `<name>.set-aside-<time>` beside it (deleting nothing); returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.set-aside-{stamp}")
    number = 1
    while os.path.lexists(aside):
        number += 1
        aside = path.with_name(f"{path.name}.set-aside-{stamp}-{number}")
    path.rename(aside)
    return aside


def make_room_for(path: Path) -> None:
    """Clear the way for a save into `path`: an unfinished save there (no manifest) is deleted; anything
    else (a complete checkpoint of a branch resumed before it, or one that cannot be read) is set aside."""
    if not os.path.lexists(path):
        return
    if read_manifest(path)[1] == NO_MANIFEST:
        try:
            shutil.rmtree(path)
            return
        except OSError:
            pass  # something in it cannot be deleted: set the rest aside
    aside = set_aside(path)
    print(f"warning: {path} is in the way of this step's checkpoint and is not an unfinished save that can be "
          f"deleted; moved it to {aside}", flush=True)


def find_resumable(root: Path, layout: dict) -> tuple[Path, dict] | None:
    """The newest intact checkpoint this layout can resume from, skipping damaged ones with a warning;
    None when `root` holds none.

    A sharded checkpoint resumes only into the parallel layout that wrote it; when the newest intact
    one has another layout and no consolidated twin, that is an error naming the way out. When none
    verifies, that is an error listing each one's problem, unless they are all saves that never finished
    in a directory where no checkpoint was ever published (no `latest`): a run killed in its first save."""
    candidates, listing_error = broadcast_object(_listing(root) if _is_main() else None)
    if listing_error:
        raise ConfigError(listing_error)
    damaged = []
    for path in candidates:
        manifest, problem = verify(path)
        if problem:
            damaged.append((path, problem))
            continue
        if _is_main():
            for skipped, why in damaged:
                print(f"warning: skipping checkpoint {skipped}: {why}", flush=True)
        if manifest["kind"] == CONSOLIDATED or manifest["layout"] == layout:
            return path, manifest
        if consolidated_twin(path) not in candidates:
            raise ConfigError(layout_mismatch(path, manifest["layout"], layout))
    problems = "; ".join(f"{path.name}: {why}" for path, why in damaged)
    published = broadcast_object(os.path.lexists(root / "latest") if _is_main() else None)
    if damaged and (published or any(why != NO_MANIFEST for _, why in damaged)):
        raise ConfigError(f"{root}: none of its {len(damaged)} checkpoints can be resumed: {problems}. Repair or "
                          f"remove them, resume one by path (--resume PATH), or start over with --no-resume, "
                          f"which moves them aside and deletes nothing")
    if damaged and _is_main():
        print(f"warning: no checkpoint under {root} was ever completed ({problems}); starting from step 0", flush=True)
    return None


def _listing(root: Path) -> tuple[list[Path], str | None]:
    """(`list_checkpoints`, None), or ([], its error message): a form that can be broadcast."""
    try:
        return list_checkpoints(root), None
    except ConfigError as err:
        return [], str(err)


def layout_mismatch(path: Path, saved: dict, current: dict) -> str:
    return (f"checkpoint {path} was written by the layout {describe_layout(saved)} and this run is "
            f"{describe_layout(current)}; a sharded checkpoint resumes only into its own layout. Consolidate it "
            f"(python launch/checkpoint.py consolidate {path}) and this run resumes from the consolidated copy")


def describe_layout(layout: dict) -> str:
    return (f"{layout['world_size']} ranks (tp {layout['tp']}, ep {layout['ep']}), ZeRO {layout['zero_stage']}, "
            f"{layout['precision']}")


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
    manifest, problem = read_manifest(path)
    if problem:
        raise ValueError(f"{path}: neither an exported EMA file nor a usable checkpoint ({problem})")
    if manifest["kind"] != CONSOLIDATED:
        raise ValueError(f"{path} is a sharded checkpoint: export its EMA weights first "
                         f"(python launch/checkpoint.py export-ema {path} --out ema.safetensors)")
    ema = torch.load(path / "ema.pt", map_location="cpu", mmap=True, weights_only=False)
    return manifest["config"], {plain_name(name): tensor for name, tensor in ema.items()}, manifest["step"]


def read_consolidated(path: Path) -> dict:
    """A consolidated checkpoint's whole tensors, memory-mapped (a rank reads the pages of its shards only):
    "params" (fp32 weights), "moments" (name -> exp_avg, exp_avg_sq), "ema" (weights and buffers), "buffers",
    "adam_step", "trainer" (the trainer's position)."""
    part = {name: torch.load(path / f"{name}.pt", map_location="cpu", mmap=True, weights_only=False)
            for name in CONSOLIDATED_PARTS}
    moments = {name: {"exp_avg": part["exp_avg"][name], "exp_avg_sq": part["exp_avg_sq"][name]}
               for name in part["weights"]}
    return {"params": part["weights"], "moments": moments, "ema": part["ema"], **part["state"]}


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
