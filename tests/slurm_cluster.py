"""A private Slurm cluster on this machine (one slurmctld, one slurmd per node, its own munged),
for tests that need real sbatch/srun/requeue/signal behaviour. Standard library only.

    with LocalSlurmCluster(tmp_path, nodes=2) as cluster:
        job_id = cluster.submit(script, "--nodes=2", env_overrides={"SBATCH_TIMELIMIT": "5"})
        cluster.wait_for(job_id, lambda job: job.finished)

Clients must run with `cluster.env` (it points SLURM_CONF at this cluster's slurm.conf); jobs
inherit it, so `srun` inside a batch script finds the cluster too, unless the job is submitted
with --export=NONE. Finished jobs stay queryable for MinJobAge (10 min); there is no accounting,
so no sacct. A requeued job starts again about 11 s later: slurm.conf's AuthInfo cred_expire=10
sets that delay (Slurm's default is 120 s, its minimum 5 s) and sched_interval=1 makes the
scheduler notice at once (its default idle poll is 60 s).
Needs root (the daemons run as root); installs Slurm with launch/install_slurm.sh when missing.
"""
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALLER = REPO_ROOT / "launch" / "install_slurm.sh"
REQUIRED_BINARIES = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo",
                     "slurmctld", "slurmd", "munged")
# Client settings inherited from a surrounding job or shell would leak into our submissions.
SLURM_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCANCEL_")
# The daemons live in sbin, which a non-login shell's PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class SlurmClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class JobState:
    state: str      # PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    reason: str     # why it is pending, e.g. BeginTime
    restarts: int   # how often it was requeued
    exit_code: str  # "exit_status:signal", e.g. "0:0"

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


class LocalSlurmCluster:
    def __init__(self, workdir: Path, nodes: int = 2, cpus_per_node: int = 1,
                 start_timeout: float = 60.0):
        self.workdir = Path(workdir).resolve()
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.start_timeout = start_timeout
        self.conf_path = self.workdir / "slurm.conf"
        self.log_dir = self.workdir / "log"
        self.env = _client_env(self.conf_path)
        self._rundir: Path | None = None
        self._daemons: dict[str, subprocess.Popen] = {}  # in start order

    def __enter__(self) -> "LocalSlurmCluster":
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop()

    # ---- client helpers

    def run(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sbatch, squeue, scontrol, scancel, ...) against this cluster."""
        kwargs.setdefault("env", self.env)
        return subprocess.run(args, check=check, text=True, capture_output=True, **kwargs)

    def submit(self, script: Path, *sbatch_args: str, env_overrides: dict | None = None) -> int:
        env = {**self.env, **(env_overrides or {})}
        result = self.run("sbatch", "--parsable", *sbatch_args, str(script), env=env)
        return int(result.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> JobState:
        line = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        fields = dict(re.findall(r"\b(JobState|Reason|Restarts|ExitCode)=(\S+)", line))
        return JobState(state=fields["JobState"], reason=fields["Reason"],
                        restarts=int(fields["Restarts"]), exit_code=fields["ExitCode"])

    def wait_for(self, job_id: int, predicate: Callable[[JobState], bool],
                 timeout: float = 60.0) -> JobState:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job_state(job_id)
            if predicate(job):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job} after {timeout:.0f} s\n{self.log_tails()}")
            time.sleep(0.25)

    def log_tails(self, lines: int = 20) -> str:
        tails = []
        for log in sorted(self.log_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(tails)

    # ---- start

    def _start(self) -> None:
        if os.geteuid() != 0:
            raise SlurmClusterError("LocalSlurmCluster runs slurmctld and slurmd as root; run as root")
        _ensure_installed()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Unix sockets (munge's, slurmstepd's in the spool dirs) have a ~108-byte path limit,
        # so they go to a short directory rather than under a possibly long workdir.
        self._rundir = Path(tempfile.mkdtemp(prefix="lsc", dir="/tmp"))
        self._rundir.chmod(0o755)  # munged requires its socket's directory to be searchable by all
        self._start_munged()
        self._write_conf()
        self._spawn("slurmctld", "slurmctld", "-D", "-f", str(self.conf_path))
        for node in self.node_names:
            self._spawn(f"slurmd-{node}", "slurmd", "-D", "-N", node, "-f", str(self.conf_path))
        self._wait_until_idle()

    @property
    def munge_socket(self) -> Path:
        return self._rundir / "munge.sock"

    def _start_munged(self) -> None:
        munge_dir = self.workdir / "munge"
        munge_dir.mkdir(mode=0o700, exist_ok=True)
        key = munge_dir / "munge.key"
        key.unlink(missing_ok=True)
        fd = os.open(key, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as key_file:
            key_file.write(os.urandom(1024))
        self._spawn("munged", "munged", "--foreground", f"--key-file={key}",
                    f"--socket={self.munge_socket}", f"--pid-file={munge_dir / 'munged.pid'}",
                    f"--seed-file={munge_dir / 'munged.seed'}")
        self._wait(self.munge_socket.exists, "munged to create its socket")

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.node_names))
        state_dir = self.workdir / "state"
        state_dir.mkdir(exist_ok=True)
        for name in self.node_names:
            (self._rundir / f"spool-{name}").mkdir()
        nodes = "".join(
            f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN\n"
            for name, port in zip(self.node_names, node_ports))
        self.conf_path.write_text(textwrap.dedent(f"""\
            ClusterName=lsc{secrets.token_hex(4)}
            SlurmctldHost=localhost
            SlurmctldPort={ctld_port}
            SlurmUser=root
            SlurmdUser=root
            AuthType=auth/munge
            CredType=cred/munge
            # cred_expire is also how long a requeued job waits before it may start again.
            AuthInfo=socket={self.munge_socket},cred_expire=10
            StateSaveLocation={state_dir}
            SlurmdSpoolDir={self._rundir}/spool-%n
            SlurmctldPidFile={self.workdir}/slurmctld.pid
            SlurmdPidFile={self.workdir}/slurmd-%n.pid
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            SelectType=select/cons_tres
            SelectTypeParameters=CR_CPU
            SchedulerType=sched/builtin
            SchedulerParameters=sched_interval=1
            MpiDefault=none
            JobRequeue=1
            MinJobAge=600
            ReturnToService=2
            AccountingStorageType=accounting_storage/none
            JobAcctGatherType=jobacct_gather/none
            JobCompType=jobcomp/none
            MailProg=/bin/true
            """) + nodes +
            f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP\n")

    def _spawn(self, name: str, *command: str) -> None:
        executable = shutil.which(command[0], path=SEARCH_PATH)
        # In the foreground (-D, --foreground) the daemons log to stderr, early fatal errors included.
        with open(self.log_dir / f"{name}.log", "ab") as log:
            # Own session: a Ctrl-C meant for the test run must not kill the daemons before
            # __exit__ stops them in order.
            self._daemons[name] = subprocess.Popen(
                [executable, *command[1:]], env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_until_idle(self) -> None:
        def all_idle() -> bool:
            result = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in result.stdout.splitlines())
            return result.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names)
        self._wait(all_idle, "all nodes to be idle")

    def _wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not condition():
            dead = [name for name, process in self._daemons.items() if process.poll() is not None]
            if dead or time.monotonic() > deadline:
                problem = f"{', '.join(dead)} exited" if dead else f"timed out after {self.start_timeout:.0f} s"
                raise SlurmClusterError(f"waiting for {what}: {problem}\n{self.log_tails()}")
            time.sleep(0.2)

    # ---- stop

    def _stop(self) -> None:
        controller = self._daemons.get("slurmctld")
        if controller is not None and controller.poll() is None:
            self._end_all_jobs()
        for daemon in reversed(self._daemons.values()):  # slurmds, then slurmctld, then munged
            _terminate(daemon)
        self._daemons = {}
        _kill_all(self._processes()[0])  # e.g. what a job started in a session of its own
        if self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None

    def _end_all_jobs(self) -> None:
        try:
            self.run("scancel", "--me", timeout=10)
            if not self._queue_empties(within=5.0):
                # Slurm would give processes that ignore the cancel's SIGTERM KillWait (30 s);
                # killing the jobs' processes lets their slurmstepds finish the jobs at once.
                _kill_all(self._processes()[1], signals=(signal.SIGKILL,))
                self._queue_empties(within=10.0)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass  # _stop kills what is left

    def _queue_empties(self, within: float) -> bool:
        deadline = time.monotonic() + within
        while self.run("squeue", "-h", timeout=within).stdout:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True

    def _processes(self) -> tuple[set[int], set[int]]:
        """This cluster's processes: those that carry its SLURM_CONF (daemons, slurmstepds, job
        processes, clients) and their descendants, but not this process and its ancestors;
        and among them those that its jobs run (the slurmstepds' descendants)."""
        marker = f"SLURM_CONF={self.conf_path}\0".encode()
        table = _process_table()
        parents = {pid: ppid for pid, (ppid, _, _) in table.items()}
        spared = _ancestors_of_self(parents)
        marked = {pid for pid, (_, _, environ) in table.items() if marker in environ} - spared
        cluster = marked | _descendants(marked, parents, spared)
        stepds = {pid for pid in cluster if table[pid][1] == "slurmstepd"}
        return cluster, _descendants(stepds, parents, spared)


def _client_env(conf_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SLURM_ENV_PREFIXES)}
    env["SLURM_CONF"] = str(conf_path)
    return env


def _ensure_installed() -> None:
    if all(shutil.which(b, path=SEARCH_PATH) for b in REQUIRED_BINARIES):
        return
    result = subprocess.run(["bash", str(INSTALLER)], text=True, capture_output=True)
    if result.returncode != 0:
        raise SlurmClusterError(f"{INSTALLER} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    missing = [b for b in REQUIRED_BINARIES if not shutil.which(b, path=SEARCH_PATH)]
    if missing:
        raise SlurmClusterError(f"{INSTALLER} ran, yet {', '.join(missing)} not found")


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open together so the ports are distinct.
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _terminate(process: subprocess.Popen, grace: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _process_table() -> dict[int, tuple[int, str, bytes]]:
    """pid: (parent pid, command name, environ) of every process but zombies."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:  # it exited meanwhile
            continue
        name, rest = stat[stat.index("(") + 1:].rsplit(")", 1)
        state, ppid = rest.split()[:2]
        if state != "Z":
            table[int(entry)] = (int(ppid), name, environ)
    return table


def _ancestors_of_self(parents: dict[int, int]) -> set[int]:
    ancestors, pid = set(), os.getpid()
    while pid in parents and pid not in ancestors:
        ancestors.add(pid)
        pid = parents[pid]
    return ancestors


def _descendants(roots: set[int], parents: dict[int, int], spared: set[int]) -> set[int]:
    found = set()
    while True:
        children = {pid for pid, ppid in parents.items() if ppid in roots | found} - found - spared
        if not children:
            return found
        found |= children


def _kill_all(pids: set[int], signals=(signal.SIGTERM, signal.SIGKILL), grace: float = 5.0) -> None:
    for sig in signals:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = {pid for pid in pids if _alive(pid)}
            time.sleep(0.1)
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
