"""The one exception type that means "the user asked for something we cannot do"."""

import argparse


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


def first_line(e: BaseException | str) -> str:
    """The first line of an exception's message or of a text (library errors can run to pages)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def did_you_mean(word: str, choices, cutoff: float = 0.6) -> str:
    """"; did you mean X?" for the closest of `choices` to a mistyped `word`, else ""."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]}?" if close else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line like every other user error (exit status 2), a
    suggestion for a mistyped flag, and no abbreviations (`--max-step` is not `--max-steps`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        import re

        unknown = re.findall(r"(--[\w-]+)", message.split("unrecognized arguments:", 1)[1]) \
            if "unrecognized arguments:" in message else []
        known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        hint = did_you_mean(unknown[0], known) if unknown else ""
        raise UserError(f"{message}{hint} (see {self.prog} --help)")
