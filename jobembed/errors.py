"""One error family. Every message states what was expected, what was found and how to fix it.

The CLI prints ``str(error)`` as one red line and exits with code 1; nothing else should reach a user
as a traceback.
"""

from __future__ import annotations


class JobembedError(Exception):
    """Base class: ``JobembedError(expected=..., found=..., fix=..., where=...)`` or a plain message."""

    def __init__(
        self,
        message: str | None = None,
        *,
        where: str | None = None,
        expected: str | None = None,
        found: str | None = None,
        fix: str | None = None,
    ) -> None:
        parts = []
        if where:
            parts.append(f"{where}:")
        if message:
            parts.append(message.rstrip("."))
        if expected:
            parts.append(f"expected {expected}")
        if found:
            parts.append(f"found {found}")
        text = _join(parts)
        if fix:
            text = f"{text}. Fix: {fix}"
        super().__init__(text)
        self.where, self.expected, self.found, self.fix = where, expected, found, fix


def _join(parts: list[str]) -> str:
    """'where: message; expected X; found Y' with the pieces that are present."""
    if not parts:
        return "error"
    head, rest = (parts[0], parts[1:]) if not parts[0].endswith(":") else (" ".join(parts[:2]), parts[2:])
    return "; ".join([head, *rest])


class DataError(JobembedError):
    """Input table problems: missing file/column, empty text, bad encoding, label-set mismatch."""


class ConfigError(JobembedError):
    """Invalid or inconsistent configuration (YAML or CLI flags)."""


class ModelError(JobembedError):
    """A model reference that cannot be resolved or loaded."""


class BundleError(JobembedError):
    """A bundle that is missing, corrupt or from another format version."""


def one_line(e: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception message on one line, with its type (for wrapping library errors)."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = text.split(". ", 1)[0]
    text = f"{type(e).__name__}: {text}" if not text.startswith(type(e).__name__) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."
