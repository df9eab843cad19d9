"""Spreading many models over the processes of an ``accelerate launch`` (or ``torchrun``) run.

``repair`` and ``scan`` both take lists of models. Started normally they handle the
list in one process; started by a launcher, every process runs the same command line
and this module decides which models each one takes:

* :meth:`Team.share` hands out ``(index, item)`` pairs with Accelerate's
  ``split_between_processes`` (contiguous slices, uneven when the list does not divide);
* :meth:`Team.gather` collects every process's results on every process with
  ``accelerate.utils.gather_object``, keeps one result per index (so nothing is counted
  twice, whatever the split) and checks that none is missing;
* :meth:`Team.broadcast` gives all processes the main process's copy of a value, for
  steps that must happen once (a Hub query, a token check) and whose outcome must be the
  same everywhere, because a process that stopped early would leave the others waiting in
  the gather forever.

Two details of running inside a process group are handled here too:
:func:`writes_on_every_rank` (transformers would otherwise save only on rank 0) and
:func:`shutdown` (leave the group cleanly, or the launcher reports a crash).

Accelerate's ``PartialState`` picks the backend: NCCL with one GPU per process, or Gloo
on CPUs. It only treats a launch as multi-CPU when asked to use the CPU, so the CPU is
requested when ``ACCELERATE_USE_CPU`` is set, when the caller wants the CPU, or when the
launcher started several processes on a machine without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar


T = TypeVar("T")
R = TypeVar("R")

_TRUE = ("1", "true", "yes", "on")


def launched_processes() -> int:
    """How many processes the launcher says it started (1 when run directly)."""
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 1


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 when run directly), readable before
    Accelerate is set up: only rank 0 may read standard input, which every process shares."""
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 0


def wants_cpu(device: str = "auto") -> bool:
    """Whether Accelerate should be set up for the CPU (see the module docstring)."""
    if device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE:
        return True
    if device != "auto" or launched_processes() <= 1:
        return False
    import torch

    return not torch.cuda.is_available()


# How long a process may wait for the others in a collective step. Work is shared out by
# model, so one process may finish an hour before another that drew a large model; the
# usual 30 minutes would abort such a run. A crashed process does not leave the others
# waiting this long: the launcher stops them all.
WAIT_LIMIT = timedelta(hours=24)


def state(device: str = "auto") -> Any:
    """Accelerate's process state, created once per process. The first call fixes whether
    it uses the CPU, so commands call this with their ``--device`` before anything else."""
    from accelerate import PartialState

    if launched_processes() > 1:
        return PartialState(cpu=wants_cpu(device), timeout=WAIT_LIMIT)
    return PartialState(cpu=wants_cpu(device))


@dataclass
class Team:
    """This process's place among the launched processes."""

    index: int
    size: int
    _state: Any = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This process's items, each with its position in ``items``."""
        indexed = list(enumerate(items))
        if not self.distributed:
            return indexed
        with self._state.split_between_processes(indexed) as mine:
            return list(mine)

    def gather(self, results: list[tuple[int, R]], expected: int) -> list[R]:
        """Every process's ``(index, result)`` pairs, on every process, one per index in order."""
        pairs = results
        if self.distributed:
            from accelerate.utils import gather_object

            pairs = gather_object(results)
        by_index: dict[int, R] = {}
        for i, result in pairs:
            by_index.setdefault(int(i), result)
        missing = sorted(set(range(expected)) - set(by_index))
        if missing:
            raise RuntimeError(f"results for items {missing} were not gathered from the worker processes")
        return [by_index[i] for i in range(expected)]

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value`` on every process."""
        if not self.distributed:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]


def team(device: str = "auto") -> Team:
    """The current team of processes; a one-process team when not launched in parallel.

    Without a launcher, Accelerate is not set up here at all, so a plain run pays nothing
    and ``--device cpu`` never touches it.
    """
    if launched_processes() <= 1:
        return Team(index=0, size=1)
    st = state(device)
    return Team(index=st.process_index, size=st.num_processes, _state=st)


@contextmanager
def writes_on_every_rank(model: Any) -> Iterator[None]:
    """Let this process write ``model`` even when it is not rank 0.

    Once ``torch.distributed`` is initialised, transformers' ``save_pretrained`` writes only
    on rank 0, because in training every rank holds a copy or a shard of one model. Here
    each process holds whole, different models, and a model repaired on rank 1 would
    otherwise be saved without its config and weights.
    """
    import torch.distributed as dist

    other_rank = dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
    if not other_rank or not hasattr(model, "should_save_on_this_rank"):
        yield
        return
    model.should_save_on_this_rank = lambda is_main_process=True: is_main_process
    try:
        yield
    finally:
        del model.should_save_on_this_rank


def shutdown(clean: bool = True) -> None:
    """Leave the process group at the end of a command. After a normal end every process
    meets the others in a barrier first (without it a Gloo worker that exits while its
    threads still run is aborted, and the launcher reports a failure). After an error
    (``clean=False``) this process may be the only one that stopped, while the others wait
    for it in a collective step: it leaves at once, and the launcher, seeing it fail,
    stops the rest instead of letting them wait out :data:`WAIT_LIMIT`."""
    if launched_processes() <= 1:
        return
    import torch.distributed as dist

    if not clean:
        return
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
