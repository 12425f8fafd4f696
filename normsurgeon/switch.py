"""A nestable, process-wide off switch for an optional fast path, so that benchmarks and tests can
run the same work both ways."""
from __future__ import annotations

import contextlib


class OffSwitch:
    """``with switch():`` turns the path off within the block (blocks nest); ``bool(switch)`` is True
    while any block is open."""

    def __init__(self) -> None:
        self._depth = 0

    def __bool__(self) -> bool:
        return self._depth > 0

    @contextlib.contextmanager
    def __call__(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
