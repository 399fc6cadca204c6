"""Stall reports: a daemon thread that says, once per stall, when this rank has made no progress for a while.

A rank waiting in a collective for a stalled peer prints nothing of its own; this says where it stands
("rank 1: no progress for 120 s at step 5000 (training)") long before the collective times out, and
again when it moves on. The loop `tick`s it at every step boundary and before long phases."""
import sys
import threading
import time


class StallWatchdog:
    def __init__(self, rank: int, after_s: float, clock=time.monotonic, start: bool = True):
        self.rank, self.after_s, self._clock = rank, after_s, clock
        self._state = (clock(), 0, "starting")  # (time of the last tick, step, what the rank was doing): one tuple,
        self._reported = None  # replaced whole, so the thread never reads a half-updated state; tick time reported
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        if start:
            self._thread.start()

    def tick(self, step: int, doing: str = "training") -> None:
        self._state = (self._clock(), step, doing)

    def check(self) -> str | None:
        """The line to print now, if any: the start of a stall (once), or the end of a reported one."""
        last, step, doing = self._state
        idle = self._clock() - last
        if idle >= self.after_s and self._reported != last:
            self._reported = last
            return f"rank {self.rank}: no progress for {idle:.0f} s at step {step} ({doing})"
        if self._reported is not None and self._reported != last:
            self._reported = None
            return f"rank {self.rank}: progressing again at step {step} ({doing})"
        return None

    def _watch(self) -> None:
        while not self._closed.wait(min(self.after_s / 4, 10.0)):
            line = self.check()
            if line:
                print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()
