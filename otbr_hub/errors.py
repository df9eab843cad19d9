"""Errors that the CLI turns into one-line messages and exit codes."""

from __future__ import annotations


class OtbrError(Exception):
    """A problem the user can act on. The CLI prints ``str(err)`` and exits with ``exit_code``."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(OtbrError, ValueError):
    """Bad arguments or settings (exit code 4 for scan, 2 for repair). Also a ValueError, so
    that code catching ``ValueError`` from a settings class keeps working."""

    exit_code = 4


class UnsupportedModelError(OtbrError):
    """The source is not an image classifier this tool can handle."""


class HubError(OtbrError):
    """A Hugging Face Hub request failed in a way the user can understand."""


def error_text(err: BaseException) -> str:
    """An error as one line for people and reports: an :class:`OtbrError`'s own message, any
    other exception as ``unexpected <type>: <first line>`` (a bug or a library's own failure)."""
    if isinstance(err, OtbrError):
        return str(err)
    lines = str(err).strip().splitlines()
    return f"unexpected {type(err).__name__}" + (f": {lines[0]}" if lines else "")
