"""Shared fixtures. Fixture modules live beside this file and are imported here."""

import os

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny test models run faster single-threaded, and tests may run beside other work.
os.environ.setdefault("OMP_NUM_THREADS", "1")
from hubserver import hub_server  # noqa: E402,F401
