#!/usr/bin/env python
"""Peak host memory of consolidating (resharding) a sharded checkpoint, against one copy of its training state.

  python benchmarks/consolidation_memory.py runs/x/checkpoints/step_00001000

Runs `launch/checkpoint.py consolidate` on the checkpoint (into a temporary directory) and samples the resident
memory of the whole process tree every 50 ms. One copy of the training state is what the ranks of the saved
layout hold of it together: of every parameter, the weight in the training precision, its fp32 master
under ZeRO, two fp32 Adam moments and the fp32 EMA (18 bytes in bf16 with ZeRO, 16 in fp32 without).
Prints one JSON line and one readable line.
"""
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from diffmoe_scale.cli import docstring_parser
from diffmoe_scale.config import config_from_dict
from diffmoe_scale.estimate import PRECISION_BYTES, count_parameters

REPO = Path(__file__).resolve().parents[1]


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants."""
    children, rss = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        rss[int(stat.parent.name)] = int(fields[21]) * 4096  # field 24: resident pages
    total, frontier = rss.get(pid, 0), [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        total += sum(rss.get(child, 0) for child in frontier)
    return total


def peak_while(command: list[str]) -> tuple[int, float]:
    """(peak resident bytes of the process tree, seconds) of running `command`."""
    began, peak = time.perf_counter(), 0
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    if code:
        sys.exit(f"{' '.join(command)} exited {code}")
    return peak, time.perf_counter() - began


def main() -> None:
    parser = docstring_parser(__doc__)
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args()
    manifest = json.loads((args.checkpoint / "manifest.json").read_text())
    config = config_from_dict(manifest["config"], source=str(args.checkpoint))
    parameters = sum(numel for _, numel in count_parameters(config).sizes)
    master = 4 if config.parallel.zero_stage else 0
    state = parameters * (PRECISION_BYTES[config.train.precision] + master + 8 + 4)
    with tempfile.TemporaryDirectory() as out:
        peak, seconds = peak_while([sys.executable, "launch/checkpoint.py", "consolidate", str(args.checkpoint),
                                    "--out", str(Path(out) / "consolidated")])
    result = {"checkpoint": str(args.checkpoint), "layout": manifest["layout"], "parameters": parameters,
              "training_state_bytes": state, "peak_bytes": peak, "ratio": peak / state, "seconds": seconds}
    print(json.dumps(result))
    print(f"{parameters / 1e6:.1f} M parameters, training state {state / 2**30:.2f} GiB; consolidation peaked at "
          f"{peak / 2**30:.2f} GiB of host memory ({peak / state:.2f}x) in {seconds:.0f} s")


if __name__ == "__main__":
    main()
