"""The ``jobembed`` command line (Typer). ``app`` is the entry point.

``jobembed.cli.base`` holds the app and what every command shares, below the stages (whose modules define their own
commands); ``jobembed.cli.commands`` adds the stages' commands and the others. ``app`` is looked up on first use so
that a stage module can import ``jobembed.cli.base`` without pulling in every stage.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "FORMER_COMMANDS"):
        from jobembed.cli import commands

        return getattr(commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
