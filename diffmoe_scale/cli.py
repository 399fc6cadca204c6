"""What the entry point and the command-line tools in launch/ share."""
import argparse
import signal
import sys
import time

from .parallel.launcher import environment_rank

GRACE_SECONDS = 10.0  # how long a failing rank other than the first waits for its launcher to end it


def docstring_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first line and whose epilog is the rest."""
    first_line, _, rest = doc.partition("\n")
    return argparse.ArgumentParser(description=first_line, epilog=rest.lstrip("\n"),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def report_error(message: str, ranks_leave_together: bool = False) -> None:
    """`message` on stderr, from the first rank only: every rank checks the same inputs and fails alike, so one
    line says it (on any number of ranks, before and after distributed start-up).

    Unless the ranks then leave together (a collective shutdown), another rank first waits a while: were it
    to exit at once, its launcher (torchrun, srun) could end the first rank before that one has printed.
    Normally the launcher ends the waiting rank when the first exits (its SIGTERM ends a failing rank: there
    is nothing to save); a rank still running afterwards failed where the first did not, and says it itself."""
    if environment_rank() != 0:
        if ranks_leave_together:
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(GRACE_SECONDS)
    print(message, file=sys.stderr, flush=True)
