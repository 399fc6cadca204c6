"""Stop requests by signal: finish the unit of work at hand, save, and exit with a status that says why."""
import signal

EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved on SIGTERM/SIGUSR1; the Slurm recipes requeue on it


class StopRequest:
    """SIGINT, SIGTERM and SIGUSR1 ask to save and stop at the end of the current `unit` of work
    (a training step, a shard); `exit_code` becomes non-zero. A second SIGINT aborts at once.

    The handler only records the signal: it runs between any two bytecodes of the loop, where printing
    could re-enter a stream the loop is writing. The loop calls `announce` at its boundaries."""

    EXIT_CODES = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_PREEMPTED, signal.SIGUSR1: EXIT_PREEMPTED}

    def __init__(self, unit: str = "step"):
        self.unit = unit
        self.exit_code = 0
        self.received = []  # signals not yet announced (list.append and pop are atomic for the handler)
        self._announced = set()
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.EXIT_CODES}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.exit_code == EXIT_INTERRUPTED:
            raise KeyboardInterrupt
        self.exit_code = max(self.exit_code, self.EXIT_CODES[signum])
        self.received.append(signum)

    def announce(self) -> None:
        """Say what each signal received since the last call asked for, once per kind of signal (a rank may
        get one from the job's launcher and the same one again when the launcher dies)."""
        while self.received:
            signum = self.received.pop(0)
            if signum in self._announced:
                continue
            self._announced.add(signum)
            print(f"{signal.Signals(signum).name}: saving and stopping at the end of this {self.unit}"
                  f"{' (Ctrl-C again to abort now)' if signum == signal.SIGINT else ''}", flush=True)

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
