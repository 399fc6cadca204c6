"""What the entry point and the command-line tools in launch/ share."""
import argparse
import signal
import sys
import time

from .parallel.launcher import environment_rank


def docstring_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first line and whose epilog is the rest."""
    first_line, _, rest = doc.partition("\n")
    return argparse.ArgumentParser(description=first_line, epilog=rest.lstrip("\n"),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def report_error(message: str, grace_seconds: float = 10.0) -> None:
    """`message` on stderr, from the first rank only: every rank checks the same inputs and fails alike, so one
    line says it (on any number of ranks, before and after distributed start-up).

    Another rank first waits `grace_seconds`: were it to exit at once, its launcher (torchrun, srun) could end
    the first rank before that one has printed. Normally the launcher ends the waiting rank when the first
    exits (its SIGTERM ends a failing rank: there is nothing to save); a rank still running afterwards failed
    where the first did not, and says it itself."""
    if environment_rank() != 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(grace_seconds)
    print(message, file=sys.stderr, flush=True)
