"""What the entry point and the command-line tools in launch/ share."""
import argparse
import sys

from .parallel.launcher import environment_rank


def docstring_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first line and whose epilog is the rest."""
    first_line, _, rest = doc.partition("\n")
    return argparse.ArgumentParser(description=first_line, epilog=rest.lstrip("\n"),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def report_error(message: str) -> None:
    """`message` on stderr, from the first rank only: every rank checks the same inputs and fails alike, so one
    line says it (on any number of ranks, before and after distributed start-up)."""
    if environment_rank() == 0:
        print(message, file=sys.stderr, flush=True)
