"""What the command-line tools in launch/ share."""
import argparse


def docstring_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first line and whose epilog is the rest."""
    first_line, _, rest = doc.partition("\n")
    return argparse.ArgumentParser(description=first_line, epilog=rest.lstrip("\n"),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
