"""Samples on disk while they are being made: one shard file per rank and token pool, checked on a rerun, merged
into one .npz in ADM's layout at the end.

Sample i belongs to token pool i // batch_size; a pool is sampled whole (samples past --num-samples
included, then dropped), so each sample's pool, and hence its pixels, does not depend on the number of
ranks, on how they are interrupted, or on how many samples are asked for. Shard files are named by the
samples they hold, `samples_<start>_<stop>.npz` (uint8 images [n, H, W, C], int64 labels [n]), written to a
temporary name and renamed, so a file under its final name was written whole. A rerun reads every shard
through (the zip members' CRCs catch damage), deletes what is damaged and the shards of pools that are
not complete (a rank killed between two ranks' writes), and samples what is missing. `manifest.json` holds
what determines the samples: a rerun with other settings is refused instead of mixing two kinds.
"""
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
SHARD = re.compile(r"samples_(\d{8})_(\d{8})\.npz")
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # zip entries' timestamps: the same bytes for the same samples


def shard_name(start: int, stop: int) -> str:
    return f"samples_{start:08d}_{stop:08d}.npz"


def expected_labels(start: int, stop: int, num_classes: int) -> np.ndarray:
    """Labels cycle through the classes: sample i is of class i mod num_classes."""
    return np.arange(start, stop, dtype=np.int64) % num_classes


def write_shard(directory: Path, start: int, images: np.ndarray, labels: np.ndarray, c_avgs: list[float]) -> Path:
    """`c_avgs`: the C_avg of every MoE layer call that sampled them (empty for a dense model)."""
    path = directory / shard_name(start, start + len(images))
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        np.savez(file, images=images, labels=labels, c_avgs=np.asarray(c_avgs, dtype=np.float64))
    os.replace(temporary, path)
    return path


def shard_problem(path: Path, num_classes: int) -> str | None:
    """What is wrong with a shard file (read whole), or None."""
    start, stop = map(int, SHARD.fullmatch(path.name).groups())
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        return f"unreadable ({err})"
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != stop - start:
        return f"holds {images.dtype} images of shape {list(images.shape)}, not {stop - start} uint8 images"
    if not np.array_equal(labels, expected_labels(start, stop, num_classes)):
        return "holds other labels than its samples'"
    return None


def check_manifest(directory: Path, identity: dict) -> str | None:
    """Write `identity` as the directory's manifest, or say how it differs from the one there (None: same)."""
    path = directory / MANIFEST
    if not path.exists():
        if any(directory.glob("samples_*")):
            return f"{directory} holds shards but no {MANIFEST}: they may be of other settings"
        directory.mkdir(parents=True, exist_ok=True)
        path.with_name(MANIFEST + ".tmp").write_text(json.dumps(identity, indent=1))
        path.with_name(MANIFEST + ".tmp").replace(path)
        return None
    saved = json.loads(path.read_text())
    changed = [f"{key}: {saved.get(key)!r} -> {identity.get(key)!r}" for key in sorted({*saved, *identity})
               if saved.get(key) != identity.get(key)]
    return f"{directory} holds samples of other settings ({'; '.join(changed)})" if changed else None


def list_shards(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if SHARD.fullmatch(p.name))


def complete_pools(ranges: list[tuple[int, int]], num_samples: int, batch_size: int) -> tuple[set[int], list]:
    """(the pools whose shards cover all their samples below num_samples, the ranges of the other pools below
    num_samples: incomplete, to be deleted and redone). Pools past num_samples are left alone."""
    by_pool = {}
    for start, stop in sorted(ranges):
        by_pool.setdefault(start // batch_size, []).append((start, stop))
    done, incomplete = set(), []
    for pool, parts in by_pool.items():
        if pool * batch_size >= num_samples:
            continue
        end = pool * batch_size
        for start, stop in parts:
            end = stop if start == end else -1
        if end >= min((pool + 1) * batch_size, num_samples):
            done.add(pool)
        else:
            incomplete += parts
    return done, incomplete


def merge_shards(directory: Path, num_samples: int, out: Path,
                 keep: set[int] = frozenset()) -> tuple[dict[int, np.ndarray], float | None]:
    """Write samples 0..num_samples-1 from the shards to `out` (arr_0 images, arr_1 labels), one shard in
    memory at a time; returns the images of the sample indices in `keep` and the mean inference C_avg
    (None for a dense model). The zip entries have fixed timestamps and no compression, so the same
    samples give the same bytes."""
    files = sorted((int(m.group(1)), int(m.group(2)), m.group(0)) for m in map(SHARD.fullmatch, list_shards(directory))
                   if int(m.group(1)) < num_samples)
    kept, labels, c_avgs, position, header = {}, [], [], 0, None
    temporary = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open(zipfile.ZipInfo("arr_0.npy", FIXED_TIME), "w", force_zip64=True) as member:
            for start, stop, name in files:
                if start != position:
                    raise ValueError(f"{directory}: samples {position}..{start - 1} are missing")
                with np.load(directory / name, allow_pickle=False) as data:
                    images, part_labels = data["images"][: num_samples - start], data["labels"][: num_samples - start]
                    c_avgs.append(data["c_avgs"])
                if header is None:
                    header = {"descr": np.lib.format.dtype_to_descr(images.dtype), "fortran_order": False,
                              "shape": (num_samples, *images.shape[1:])}
                    np.lib.format.write_array_header_1_0(member, header)
                elif images.shape[1:] != header["shape"][1:]:
                    raise ValueError(f"{directory / name}: images of shape {images.shape[1:]}, the others' are "
                                     f"{header['shape'][1:]}")
                member.write(np.ascontiguousarray(images).data)
                labels.append(part_labels)
                kept.update({i: images[i - start].copy() for i in keep if start <= i < start + len(images)})
                position = start + len(images)
        if position != num_samples:
            raise ValueError(f"{directory}: samples {position}..{num_samples - 1} are missing")
        with archive.open(zipfile.ZipInfo("arr_1.npy", FIXED_TIME), "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.concatenate(labels), allow_pickle=False)
    os.replace(temporary, out)
    c_avgs = np.concatenate(c_avgs)
    return kept, float(c_avgs.mean()) if len(c_avgs) else None
