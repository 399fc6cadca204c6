"""A rank and the launcher that started it, before any distributed start-up: which launcher it is (from the
environment alone), stopping when the launcher dies, and telling launch/supervise.py its pid and exit status
(`exit_process`, every rank's way out).

Stopping with the launcher uses Linux's prctl(PR_SET_PDEATHSIG, SIGTERM): the kernel sends the rank SIGTERM
the moment its parent exits, however it died (killed by a signal it does not handle, such as torchrun by
SIGUSR1, or by SIGKILL), with no polling thread and no delay; SIGTERM then saves and stops like a
preemption. A rank started by plain `python` is its own launcher and keeps running if its shell goes away
(nohup).
"""
import ctypes
import os
import signal
import sys
from pathlib import Path

MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
SUPERVISOR_DIR = "DIFFMOE_SUPERVISOR_DIR"  # set by launch/supervise.py and slurm/lib.sh
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def launcher_in_environment() -> str:
    """"env" (torchrun, the deepspeed launcher: RANK and WORLD_SIZE set), "srun", "mpirun" or "single process"."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "env"
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ:  # srun sets the step; sbatch alone does not
        return "srun"
    if any(name in os.environ for name in MPI_RANK_VARIABLES):
        return "mpirun"
    return "single process"


def environment_rank() -> int:
    """This process's rank as its launcher gave it (0 for a single process), known before distributed start-up."""
    launcher = launcher_in_environment()
    if launcher == "env":
        return int(os.environ["RANK"])
    if launcher == "srun":
        return int(os.environ["SLURM_PROCID"])
    if launcher == "mpirun":
        return int(next(os.environ[name] for name in MPI_RANK_VARIABLES if name in os.environ))
    return 0


def stop_when_launcher_dies(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel for `signum` when this process's parent (its launcher) exits; True when set.
    Install the handler of `signum` first. Linux only; elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signum)
    return True


def tie_to_launcher() -> None:
    """What a rank does first, once its stop handlers are installed: stop when a launcher that started it
    dies, and tell launch/supervise.py (if it runs this job) the pid to forward stop signals to."""
    if launcher_in_environment() != "single process":
        stop_when_launcher_dies()
    directory = os.environ.get(SUPERVISOR_DIR)
    if directory:
        Path(directory, f"pid_{os.getpid()}").touch()


def report_exit_status(code: int) -> None:
    """Leave this process's exit status for launch/supervise.py or slurm/lib.sh: torchrun and mpirun report
    1 for any failing worker, and srun the highest status of its tasks, a killed one's included."""
    directory = os.environ.get(SUPERVISOR_DIR)
    if not directory:
        return
    written = Path(directory, f".exit_{os.getpid()}.tmp")
    try:
        written.write_text(f"{code}\n")
        written.replace(Path(directory, f"exit_{os.getpid()}"))
    except OSError:
        pass  # the directory went away: the launcher's own status is all there is


def exit_process(code: int) -> None:
    """Leave without interpreter teardown, once everything is written and the groups are shut down.

    At teardown the process groups' C++ threads are destroyed in no set order, and now and then a
    rank that finished cleanly dies of SIGABRT ("terminate called without an active exception")."""
    report_exit_status(code)
    mpi = sys.modules.get("mpi4py.MPI")  # started by mpirun: MPI wants its finalize before exit
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
