"""What several test files need to start runs in subprocesses or in this process, and read their outputs."""
import contextlib
import io
import json
import os
import runpy
from pathlib import Path

from diffmoe_scale.parallel.runtime import environment_without_launcher as clean_env  # noqa: F401  (tests use it)
from diffmoe_scale.train.checkpoint import MANIFEST, file_digest

# The tiny ImageFolder of conftest.py: class names, and the size of each class's images.
CLASSES = ["cat", "dog", "owl"]
SIZES = [(20, 30), (48, 36), (33, 33), (70, 40)]  # odd, wide, tall, large


# bf16 matmuls run about 50x slower than fp32 on a CPU without bf16 instructions (AVX2 only, as here): runs in
# bf16 narrow the digits model, so that their time goes to what they test.
NARROW = ("model.hidden_size=32", "model.num_heads=2")

REPO = Path(__file__).resolve().parents[1]


def launch_tool(name: str, *args: str) -> str:
    """launch/<name>.py run in this process (for the tools that start no process group: checkpoint, evaluate);
    what it printed."""
    main = runpy.run_path(str(REPO / "launch" / f"{name}.py"))["main"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(list(args))
    assert code == 0, f"launch/{name}.py {' '.join(args)} exited {code}:\n{printed.getvalue()}"
    return printed.getvalue()


def train_and_export_ema(runtime, config: str, out: Path, steps: int) -> Path:
    """`config` trained in this process for `steps` steps of batch 32 (its end-of-run grid drawn in 2 sampling
    steps), and its last checkpoint's EMA exported (consolidated first) to out/ema.safetensors: returns that."""
    from diffmoe_scale.config import load_config
    from diffmoe_scale.train.trainer import Trainer

    overrides = [f"train.max_steps={steps}", "train.global_batch_size=32", f"train.out_dir={out}", "sample.steps=2",
                 "sample.per_class=1"]
    assert Trainer(load_config(REPO / config, overrides), runtime).train() == 0
    weights = out / "ema.safetensors"
    launch_tool("checkpoint", "export-ema", str(out / "checkpoints" / f"step_{steps:08d}"), "--out", str(weights))
    return weights


FAKE_LAYOUT = {"world_size": 1, "tp": 1, "ep": 1, "zero_stage": 0, "precision": "fp32"}


def write_fake_checkpoint(root: Path, step: int, complete: bool = True, consolidated: bool = False) -> Path:
    """A checkpoint directory (sharded, or its consolidated copy) with one random file and, when complete, a
    manifest for it."""
    path = root / (f"step_{step:08d}" + ("_consolidated" if consolidated else ""))
    path.mkdir(parents=True)
    (path / "weights.pt").write_bytes(os.urandom(64))
    if complete:
        kind = "consolidated" if consolidated else "sharded"
        manifest = {"kind": kind, "step": step, "layout": FAKE_LAYOUT, "run_id": "fake", "code_version": "x",
                    "saved_at": "now", "config": {"model": {"depth": 2, "hidden_size": 8}, "moe": {"ffn": "dense"}},
                    "files": {"weights.pt": file_digest(path / "weights.pt")}}
        (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (run-<id>.wandb): a LevelDB-style log of 32 KiB
    blocks after a 7-byte file header, each record in chunks with a 7-byte header (crc32, length, kind)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, payload, records = 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def processes_with(variable: str, value: str) -> dict[int, dict[str, str]]:
    """Live processes whose environment holds `variable`=`value` (a marker a test gives the processes it starts):
    pid -> environment. Zombies (exited, not yet reaped) have no environment and are not listed."""
    found = {}
    for path in Path("/proc").glob("[0-9]*/environ"):
        try:
            entries = path.read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile, or not ours
        environment = dict(entry.decode(errors="replace").partition("=")[::2] for entry in entries if b"=" in entry)
        if environment.get(variable) == value:
            found[int(path.parent.name)] = environment
    return found
