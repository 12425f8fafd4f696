"""How many CPU threads torch uses while a command runs (``--threads``).

torch's default is one intra-op thread per core. For small models, and on a machine other processes
keep busy, that is often much slower than one thread: every operator waits for its slowest thread,
and a thread that lost its core stalls all the others. ``--threads 1`` avoids that.
"""
from __future__ import annotations

import contextlib
import operator

from normsurgeon.errors import ModelSpecError


def check(threads) -> None:
    """Raise one ModelSpecError for a thread count that makes no sense (torch is not imported)."""
    if threads is None:
        return
    try:
        count = operator.index(threads)  # ints and integer scalars (numpy), never 1.5 or "2"
    except TypeError:
        count = 0
    if isinstance(threads, bool) or count < 1:
        raise ModelSpecError(f"--threads {threads}: must be 1 or more (leave it out for the library default)")


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block with ``torch.set_num_threads(threads)`` (None: leave torch's setting alone), then
    restore the caller's setting."""
    check(threads)
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(operator.index(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
