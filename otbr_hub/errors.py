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
