"""``otbr-hub scan``: argument parsing and the command (filled in by the scan work)."""

from __future__ import annotations

import argparse

from .errors import UsageError


def add_scan_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("scan", help="check models for backdoors (no data needed) and unsafe weight files")
    s.add_argument("targets", nargs="*", help="model folders, weight files or Hub repo ids (user/model[@rev])")


def cmd_scan(args: argparse.Namespace) -> int:
    raise UsageError("scan is not available yet", exit_code=4)
