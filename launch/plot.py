#!/usr/bin/env python
"""PNG plots of a run from its metrics.jsonl: loss curves, per-layer per-expert capacity over the
run, and capacity by noise level and by class.

  python launch/plot.py runs/digits_diffmoe_e4_flow            # writes runs/.../plots/*.png
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LOSSES = ("loss", "predictor_loss", "balance_loss", "vb_loss")


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    for name in LOSSES:
        if name in records[0]:
            axes.plot(steps, [r[name] for r in records], label=name)
    axes.set(xlabel="step", ylabel="loss", yscale="log", title="training losses")
    axes.legend()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def plot_capacity_heatmap(records: list[dict], path: Path) -> None:
    """One panel per MoE layer: C^e of each expert (rows) at each logged step (columns)."""
    tables = np.array([r["capacity"] for r in records])  # [records, layers, experts]
    layers = tables.shape[1]
    figure, axes = plt.subplots(layers, 1, figsize=(8, 1.2 + 1.0 * layers), squeeze=False, sharex=True)
    steps = [r["step"] for r in records]
    for layer, axis in enumerate(axes[:, 0]):
        image = axis.imshow(tables[:, layer].T, aspect="auto", cmap="viridis", interpolation="nearest",
                            extent=(steps[0], steps[-1], tables.shape[2] - 0.5, -0.5))
        axis.set(ylabel=f"MoE layer {layer}\nexpert")
        figure.colorbar(image, ax=axis, label="C^e")
    axes[-1, 0].set(xlabel="step")
    figure.suptitle("capacity per expert over training")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def window_means(records: list[dict], key: str) -> np.ndarray:
    """Per bin, the mean over the last half of the run's records (bins without samples skipped)."""
    rows = [[np.nan if v is None else v for v in r[key]] for r in records[len(records) // 2:] if key in r]
    return np.nanmean(np.array(rows, dtype=float), axis=0)


def plot_capacity_by_condition(records: list[dict], path: Path) -> None:
    noise, classes = window_means(records, "capacity_by_noise"), window_means(records, "capacity_by_class")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.plot((np.arange(len(noise)) + 0.5) / len(noise), noise, marker="o")
    left.set(xlabel="noise level (0 data, 1 noise)", ylabel="experts per token", title="capacity vs noise level")
    right.bar(np.arange(len(classes)), classes)
    right.set(xlabel="class", ylabel="experts per token", title="capacity vs class",
              ylim=(0.9 * np.nanmin(classes), 1.05 * np.nanmax(classes)))
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="default: <run_dir>/plots")
    args = parser.parse_args(argv)
    try:
        records = read_records(args.run_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "loss.png"]
    plot_losses(records, written[0])
    if records[0].get("capacity"):
        written += [out / "capacity_heatmap.png", out / "capacity_by_condition.png"]
        plot_capacity_heatmap(records, written[1])
        plot_capacity_by_condition(records, written[2])
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
