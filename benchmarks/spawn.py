"""How the benchmarks start their worker processes: this venv's python, or its torchrun for several ranks."""
import sys
from pathlib import Path

from diffmoe_scale.parallel.runtime import environment_without_launcher


def command(processes: int, args: list[str]) -> list[str]:
    """`python ARGS` for one process, `torchrun` with `processes` local ranks otherwise."""
    if processes == 1:
        return [sys.executable, *args]
    torchrun = Path(sys.executable).parent / "torchrun"
    return [str(torchrun), "--standalone", "--nproc_per_node", str(processes), *args]


def environment(threads: int, **extra: str) -> dict:
    """This environment without any launcher's variables (the workers are started afresh), with a fixed
    thread count per process."""
    return {**environment_without_launcher(), "OMP_NUM_THREADS": str(threads), **extra}
