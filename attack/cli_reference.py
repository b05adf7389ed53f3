"""The command-line reference page (docs/cli.md), made from the same parsers that answer `--help`,
so the page cannot drift from the flags: `python -m attack.cli_reference > docs/cli.md`
(`make docs` does it; a test holds the page equal to this output)."""

from __future__ import annotations

import contextlib
import io


def _help(module: str) -> str:
    """A subcommand's --help text (its parser lives inside its main)."""
    from importlib import import_module

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        import_module(module).main(["--help"])
    return out.getvalue()


def reference() -> str:
    from attack.__main__ import SUBCOMMANDS, attack_parser

    parts = ["# Command-line reference", "",
             "Generated from the parsers themselves (`python -m attack.cli_reference`); every config key "
             "`section.field` has the flag `--section-field`.", "", "## python -m attack", "", "```text",
             attack_parser().format_help().rstrip(), "```", ""]
    for name, (module, what) in SUBCOMMANDS.items():
        parts += [f"## python -m attack {name}", "", what, "", "```text", _help(module).rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    import os

    os.environ.setdefault("COLUMNS", "100")  # the same wrapping on every terminal
    print(reference(), end="")
