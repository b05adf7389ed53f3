"""The one exception type that means "the user asked for something we cannot do"."""

import argparse


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


def first_line(e: BaseException | str) -> str:
    """The first line of an exception's message or of a text (library errors can run to pages)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line like every other user error (exit status 2)."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")
