"""Start torch.distributed the same way under every launcher, or alone."""
import ctypes
import os
import re
import socket
import sys
from dataclasses import dataclass

import torch

from .launcher import SUPERVISOR_DIR, launcher_in_environment


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str = "single process"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[03-05,07],cpu1" -> "gpu03"."""
    head = re.match(r"[^,\[]+(\[[^\]]*\])?", nodelist).group(0)
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def _rendezvous_from_slurm() -> dict:
    """A task started by srun: ranks from SLURM_*, the master on the step's first node."""
    job_id = int(os.environ.get("SLURM_JOB_ID", "0"))
    return {
        "RANK": os.environ["SLURM_PROCID"],
        "WORLD_SIZE": os.environ["SLURM_NTASKS"],
        "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": os.environ.get("MASTER_ADDR") or first_host(
            os.environ.get("SLURM_STEP_NODELIST") or os.environ["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(20000 + job_id % 20000),  # same on every task of the job
    }


def _rendezvous_from_mpi() -> dict:
    """A process started by mpirun: ranks from mpi4py, rank 0's host and a free port broadcast."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    master = comm.bcast((socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None, root=0)
    return {"RANK": str(comm.Get_rank()), "WORLD_SIZE": str(comm.Get_size()), "LOCAL_RANK": str(local_rank),
            "MASTER_ADDR": os.environ.get("MASTER_ADDR") or master[0],
            "MASTER_PORT": os.environ.get("MASTER_PORT") or str(master[1])}


def discover_launcher() -> str:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for torch.distributed.

    torchrun and the deepspeed launcher set them; srun and mpirun are read from their own
    variables; a plain `python` start is a world of one. Returns the launcher's name."""
    launcher = launcher_in_environment()
    if launcher == "srun":
        os.environ.update(_rendezvous_from_slurm())
    elif launcher == "mpirun":
        os.environ.update(_rendezvous_from_mpi())
    elif launcher == "single process":
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return launcher


def environment_without_launcher() -> dict:
    """This process's environment without rendezvous or launcher variables: for starting another job's
    processes, which must not take this one's ranks for theirs."""
    rendezvous = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", SUPERVISOR_DIR)
    return {name: value for name, value in os.environ.items()
            if name not in rendezvous and not name.startswith(("SLURM_", "OMPI_", "PMI"))}


def processes_on_this_node() -> int:
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE"):
        if os.environ.get(name):
            return int(re.match(r"\d+", os.environ[name]).group(0))  # Slurm writes e.g. "2(x3)"
    return 1


def share_cpu_cores() -> None:
    """On CPU, split the cores among this node's ranks unless OMP_NUM_THREADS says otherwise:
    ranks that each take every core slow each other down many times over."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes_on_this_node()))


def keep_freed_cpu_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse, as CUDA's caching allocator does on a GPU.

    By default every tensor over 32 MiB is a fresh mmap whose pages fault in on first touch and go back
    to the system when freed, so large activations cost page faults every step. On the 2-core machine
    this was written on, keeping them cut page faults 40-fold and steps by 5-10% (digits config 311 ms
    instead of 339; a DiT-S-width config 1.84 s instead of 1.98). Not glibc (no mallopt): nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    libc.mallopt(m_mmap_max, 0)  # large blocks from the heap too, where freed ones are reused
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # and never hand the heap's free top back to the system


def use_this_environments_ninja() -> None:
    """Put this interpreter's bin directory first on PATH, as activating its environment would, when it
    holds a `ninja`.

    DeepSpeed builds its ops on first use (on a CPU: its shared-memory comm op, in `init_distributed`)
    with whichever `ninja` comes first on PATH. The environment's ninja (1.13, a DeepSpeed requirement) and
    a system one (Debian's 1.11) hash build commands differently, so processes that find different ones
    rebuild the op for each other: about 50 s on 2 cores at every switch of launcher."""
    bin_dir = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(bin_dir, "ninja")):
        return
    path = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry and entry != bin_dir]
    os.environ["PATH"] = os.pathsep.join([bin_dir, *path])


def cuda_device_index(local_rank: int, visible: int, ranks_on_node: int) -> int:
    """The CUDA device of this rank among the `visible` ones: its local rank where every rank of the node
    sees all of them, device 0 where the launcher gives each rank one GPU of its own (Slurm with
    --gpus-per-task or GPU binding, CUDA_VISIBLE_DEVICES set per rank)."""
    if visible == 1:
        return 0
    if local_rank < visible and ranks_on_node <= visible:
        return local_rank
    raise RuntimeError(f"local rank {local_rank} of {ranks_on_node} on this node sees {visible} GPUs "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): give every rank "
                       f"all of the node's GPUs or exactly one")


def init_runtime() -> Runtime:
    """Initialise the default process group (gloo on CPU, nccl on GPU) through DeepSpeed, under
    whichever launcher started this process (see `discover_launcher`)."""
    import deepspeed

    launcher = discover_launcher()
    use_this_environments_ninja()
    # DIFFMOE_DIST_BACKEND=gloo runs GPU ranks over gloo (CUDA tensors through host memory): several ranks on
    # one GPU, where NCCL refuses a device shared by two ranks (the GPU smoke suite does this).
    backend = os.environ.get("DIFFMOE_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", cuda_device_index(local_rank, torch.cuda.device_count(), processes_on_this_node()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        share_cpu_cores()
        keep_freed_cpu_memory()
    return Runtime(rank, world_size, local_rank, device, launcher)


def shutdown_runtime() -> None:
    """Barrier, then destroy every group and drop DeepSpeed's and megatron-core's references to them."""
    if torch.distributed.is_initialized():
        import deepspeed.comm

        torch.distributed.barrier()
        deepspeed.comm.destroy_process_group()
    if "megatron.core.parallel_state" in sys.modules:
        sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
