"""Progress display. Engine functions never print: they call an optional hook,
``progress(stage, done, total)``, and the command line decides what to show.

The hook is called with ``done=0`` when a stage starts (``total`` is None for stages
that are not counted, such as loading) and with ``done=i`` as counted work proceeds
(unlearning steps, fused layers, the margin search's image passes). Two displays are offered, both on stderr and only for a
person at a terminal:

* :class:`StageBars` - one bar per counted stage, for a single model;
* :class:`ModelLine` - one line per model that shows its current stage and ends with its
  outcome, for runs over many models, where stacked bars would scroll everything away.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    def __call__(self, stage: str, done: int = 0, total: int | None = None) -> None: ...


def bars_wanted(quiet: bool, stream: TextIO | None = None) -> bool:
    """Bars only for a person watching: not with ``--quiet`` and not into a pipe or a log file."""
    stream = stream or sys.stderr
    return not quiet and bool(getattr(stream, "isatty", lambda: False)())


class StageBars:
    """A tqdm bar for each counted stage of one model; uncounted stages show their name."""

    def __init__(self, label: str | None = None, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self._bar: Any = None
        self._stage: str | None = None

    def __call__(self, stage: str, done: int = 0, total: int | None = None) -> None:
        from tqdm.auto import tqdm

        restarted = self._bar is not None and done < self._bar.n
        if self._bar is not None and stage == self._stage and not restarted and total and self._bar.total != total:
            self._bar.total = total  # a count corrected on the way (the margin search after screening)
            self._bar.refresh()
        if stage != self._stage or restarted or (self._bar is not None and bool(self._bar.total) != bool(total)):
            self.close()
            desc = f"{self.label}: {stage}" if self.label else stage
            fmt = None if total else "{desc} ... {elapsed}"
            self._bar = tqdm(total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True, bar_format=fmt)
            self._stage = stage
        if total and done > self._bar.n:
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._stage = None, None


class ModelLine:
    """One terminal line for one model: its current stage while running, its outcome after."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        from huggingface_hub.utils import disable_progress_bars
        from tqdm.auto import tqdm

        # huggingface_hub's download bars would be drawn over this line and scroll it away; the
        # line shows the download as the model's "load" stage instead.
        disable_progress_bars()
        self.label = label
        self._bar = tqdm(total=None, desc=label, file=stream or sys.stderr, leave=True, dynamic_ncols=True,
                         bar_format="{desc} [{elapsed}]")
        self._stage: str | None = None
        self._start = self._drawn = 0.0  # when the current stage began; when the line was last redrawn

    def __call__(self, stage: str, done: int = 0, total: int | None = None) -> None:
        now = time.monotonic()
        if stage != self._stage or done == 0:
            self._stage, self._start = stage, now
        text = f"{self.label}: {stage}"
        if total:
            text += f" {done}/{total}"
            elapsed = now - self._start
            if 0 < done < total and elapsed > 5:  # a rate from a few seconds of work, not from the first step
                left = elapsed * (total - done) / done
                text += f", about {_duration(left)} left"
        self._bar.set_description_str(text, refresh=False)
        if done == 0 or done == total or now - self._drawn >= 0.2:  # at most 5 redraws a second
            self._bar.refresh()
            self._drawn = now

    def finish(self, outcome: str) -> None:
        self._bar.set_description_str(f"{self.label}: {outcome}")
        self._bar.close()

    def close(self) -> None:
        self._bar.close()


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h``: enough to decide whether to wait."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
