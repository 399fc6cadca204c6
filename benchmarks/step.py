#!/usr/bin/env python
"""Training step time, tokens/s and peak memory of the real trainer in several layouts, as ratios.

  python benchmarks/step.py                                   # digits and S configs, all twelve variants
  python benchmarks/step.py --configs S --layouts ep2,dp2 --checkpointing off --compile off --repeats 10
  python benchmarks/step.py --configs digits,S --layouts single --checkpointing off --compile off,on

Configs (the same global batch in every layout):
  digits  configs/digits_diffmoe_e4_flow.yaml as it is: width 128, 6 blocks, E=4, batch 128 x 16 tokens
  S       DiT-S width and heads (384, 6) with E=8, scaled down for a CPU: 4 blocks (2 MoE), the digits
          data with patch 1 (64 tokens per image), batch 16: 1,024 tokens per step
Layouts: single (1 process), ep2 (2 processes, EP=2: one pool, experts split), dp2 (2 processes,
EP=1: each rank its own pool and all experts), each with activation checkpointing off and on (+ac), each
eager and with compiled blocks (+compiled: train.compile, inductor; its compilation falls in the warm-up).

Every layout is a worker process set (benchmarks/step_worker.py; torchrun for two ranks) that
builds the Trainer once and times `train_step` (forward, backward, optimizer, EMA) on request. The
layouts run interleaved: each repetition times a window of --steps steps of every layout in turn;
the first repetition only warms up. Threads are fixed: --cores shared out, one process gets them
all, each of two ranks half. Step times are medians over repetitions with their min-max spread;
ratios are medians of the per-repetition ratios. Peak memory is ru_maxrss (the largest over a
layout's ranks), the lifetime peak of processes that run nothing else. Each line is one JSON object
(kind "layout" or "ratio"); a table follows.
"""
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Listener
from pathlib import Path

from diffmoe_scale.cli import docstring_parser

import spawn

REPO = Path(__file__).resolve().parents[1]

DIGITS = "configs/digits_diffmoe_e4_flow.yaml"
CONFIGS = {
    "digits": (DIGITS, []),
    "S": (DIGITS, ["model.hidden_size=384", "model.num_heads=6", "model.depth=4", "model.patch_size=1",
                   "moe.num_experts=8", "train.global_batch_size=16"]),
}
LAYOUTS = {"single": (1, "parallel.ep=1"), "ep2": (2, "parallel.ep=2"), "dp2": (2, "parallel.ep=1")}
CHECKPOINTING = {"off": "", "on": "+ac"}
COMPILE = {"off": "", "on": "+compiled"}


def variant_names(layouts: list[str], checkpointing: list[str], compiled: list[str]) -> list[str]:
    return [layout + CHECKPOINTING[ac] + COMPILE[c] for c in compiled for ac in checkpointing for layout in layouts]


def layout_of(name: str) -> str:
    return name.split("+")[0]


def comparisons(names: list[str]) -> list[tuple[str, str]]:
    """(numerator, denominator) pairs among the variants run: EP=2 vs DP=2, each vs one process, AC on vs off
    (eager), compiled vs eager."""
    pairs = []
    for suffix in CHECKPOINTING.values():
        pairs += [("ep2" + suffix, "dp2" + suffix), ("ep2" + suffix, "single" + suffix),
                  ("dp2" + suffix, "single" + suffix)]
    pairs += [(layout + "+ac", layout) for layout in LAYOUTS]
    pairs += [(layout + ac + "+compiled", layout + ac) for ac in CHECKPOINTING.values() for layout in LAYOUTS]
    return [(a, b) for a, b in pairs if a in names and b in names]


def worker_command(name: str, config: str, overrides: list[str], address: str, tmp: Path) -> list[str]:
    processes, layout_setting = LAYOUTS[layout_of(name)]
    settings = [*overrides, layout_setting, f"parallel.activation_checkpointing={'+ac' in name}",
                f"train.compile={name.endswith('+compiled')}", f"train.out_dir={tmp / name}"]
    args = ["benchmarks/step_worker.py", address, name, "--config", config]
    for setting in settings:
        args += ["--set", setting]
    return spawn.command(processes, args)


class Workers:
    """One worker process set per variant, connected back to a listener; started together, then timed in turn."""

    def __init__(self, config_name: str, names: list[str], cores: int, tmp: Path):
        config, overrides = CONFIGS[config_name]
        authkey = secrets.token_bytes(16)
        self.listener = Listener(("127.0.0.1", 0), authkey=authkey)
        address = "%s:%d" % self.listener.address
        self.logs, self.processes, self.connections, self.hello = {}, {}, {}, {}
        for name in names:
            self.logs[name] = tmp / f"{config_name}_{name}.log"
            command = worker_command(name, config, overrides, address, tmp / config_name)
            threads = max(1, cores // LAYOUTS[layout_of(name)][0])
            with open(self.logs[name], "w") as log:
                env = spawn.environment(threads, BENCH_AUTHKEY=authkey.hex())
                self.processes[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                                        stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_until_connected(len(names))

    def _wait_until_connected(self, count: int) -> None:
        def accept():
            for _ in range(count):
                connection = self.listener.accept()
                hello = connection.recv()
                self.connections[hello["name"]], self.hello[hello["name"]] = connection, hello

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=1.0)
            for name, process in self.processes.items():
                if process.poll() is not None and name not in self.connections:
                    self.fail(name)

    def fail(self, name: str):
        self.close(graceful=False)
        raise SystemExit(f"benchmark worker {name} failed:\n{self.logs[name].read_text()[-4000:]}")

    def time_window(self, name: str, steps: int) -> dict:
        try:
            self.connections[name].send(steps)
            return self.connections[name].recv()
        except (EOFError, OSError):
            self.fail(name)

    def close(self, graceful: bool = True) -> None:
        """Ask every worker to stop (graceful) or kill them all at once."""
        for connection in self.connections.values() if graceful else ():
            try:
                connection.send(None)
            except OSError:
                pass
        for process in self.processes.values():
            try:
                process.wait(timeout=60 if graceful else 0)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the worker and, under torchrun, its ranks
                process.wait()
        self.listener.close()


def spread(values: list[float], digits: int) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def measure(config_name: str, names: list[str], args, tmp: Path) -> list[dict]:
    workers = Workers(config_name, names, args.cores, tmp)
    windows = {name: [] for name in names}
    try:
        for repeat in range(args.repeats + 1):  # the first repetition warms up
            for name in names:
                result = workers.time_window(name, args.steps)
                if repeat:
                    windows[name].append(result)
    finally:
        workers.close()
    results = []
    for name in names:
        times = [window["step_time_s"] for window in windows[name]]
        tokens = workers.hello[name]["tokens_per_step"]
        results.append({"kind": "layout", "config": config_name, "layout": name,
                        "processes": workers.hello[name]["world_size"], "tokens_per_step": tokens,
                        "step_time_ms": spread([1e3 * t for t in times], 1),
                        "tokens_per_s": round(tokens / statistics.median(times)),
                        "peak_memory_mb": max(window["peak_memory_mb"] for window in windows[name])})
    memory = {result["layout"]: result["peak_memory_mb"] for result in results}
    for a, b in comparisons(names):
        ratios = [wa["step_time_s"] / wb["step_time_s"] for wa, wb in zip(windows[a], windows[b])]
        results.append({"kind": "ratio", "config": config_name, "ratio": f"{a}/{b}", "step_time": spread(ratios, 3),
                        "peak_memory": round(memory[a] / memory[b], 3)})
    return results


def with_spread(values: dict, digits: int) -> str:
    return f"{values['median']:.{digits}f} ({values['min']:.{digits}f}-{values['max']:.{digits}f})"


def print_table(results: list[dict]) -> None:
    print(f"\n{'config':<7} {'layout':<19} {'step ms (min-max)':>26} {'tokens/s':>9} {'peak MB':>8}")
    for r in results:
        if r["kind"] == "layout":
            print(f"{r['config']:<7} {r['layout']:<19} {with_spread(r['step_time_ms'], 1):>26} "
                  f"{r['tokens_per_s']:>9} {r['peak_memory_mb']:>8}")
    print(f"\n{'config':<7} {'ratio':<29} {'step time (min-max)':>22} {'peak memory':>12}")
    for r in results:
        if r["kind"] == "ratio":
            print(f"{r['config']:<7} {r['ratio']:<29} {with_spread(r['step_time'], 3):>22} {r['peak_memory']:>12.3f}")


def main(argv=None) -> int:
    parser = docstring_parser(__doc__)
    parser.add_argument("--configs", default="digits,S", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--layouts", default="single,ep2,dp2", help=f"comma-separated, of {', '.join(LAYOUTS)}")
    parser.add_argument("--checkpointing", default="off,on", help="activation checkpointing: off, on or off,on")
    parser.add_argument("--compile", default="off,on", help="compiled blocks (train.compile): off, on or off,on")
    parser.add_argument("--repeats", type=int, default=4, help="timed repetitions (after one warm-up repetition)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per layout and repetition")
    parser.add_argument("--cores", type=int, default=2,
                        help="cores the layouts share (threads per process: cores / ranks)")
    args = parser.parse_args(argv)
    names = variant_names(args.layouts.split(","), args.checkpointing.split(","), args.compile.split(","))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        for config_name in args.configs.split(","):
            for result in measure(config_name, names, args, Path(tmp)):
                print(json.dumps(result), flush=True)
                results.append(result)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
