"""Change records and results: what every pass returns and the CLI renders.

A pass never prints. It returns a :class:`SurgeryResult` whose ``changes`` list names every layer it
touched and every layer it left alone (with the reason), so a user can audit the cut.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


class Reported:
    """What every verb's result offers: ``report``, the JSON-ready dict the CLI's ``--json`` prints
    (without the envelope), and ``to_json()``, that dict as JSON text."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - each result defines it
        raise NotImplementedError

    @property
    def report(self) -> dict[str, Any]:
        return self.to_dict()

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.report, indent=indent, default=_jsonable)


def _jsonable(o: Any):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


@dataclass(frozen=True)
class Change:
    """One thing a pass did, or chose not to do, to one layer."""

    target: str  # qualified module or node name
    action: str  # replaced | folded | merged | kept | skipped | standardized | ...
    before: str = ""  # short description of what was there
    after: str = ""  # short description of what is there now
    detail: str = ""  # why, or what was chosen (e.g. "groups 32 -> 24: 72 channels")

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass
class Verification:
    """Eval-mode outputs of the rewritten model compared with the original on one probe input."""

    max_abs_error: float
    max_rel_error: float  # max |a-b| / max |ref|, over all outputs
    tolerance: float | None = None  # None: informational only (the rewrite is not meant to preserve)
    batch_independent: bool | None = None
    note: str | None = None  # e.g. why batch independence cannot hold
    compared: str = "output"  # what was compared: "output" or "features at <module> (call k)"
    problem: str | None = None  # "cannot verify: ..." / "non-finite ...": the check failed whatever the tolerance

    @property
    def ok(self) -> bool:
        if self.problem is not None:
            return False
        return self.tolerance is None or self.max_rel_error <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return d


@dataclass
class SurgeryResult(Reported):
    """What a model-rewriting verb returns: the new model and the record of every change."""

    model: Any  # torch.nn.Module (kept untyped so this module imports without torch)
    changes: list[Change] = field(default_factory=list)
    verb: str = ""
    path: str = ""  # how the model was rewritten: "fx" or "module-swap"
    verification: Verification | None = None
    info: dict[str, Any] = field(default_factory=dict)  # verb-specific figures

    def count(self, action: str) -> int:
        return sum(1 for c in self.changes if c.action == action)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verb": self.verb,
            "path": self.path,
            "changes": [c.to_dict() for c in self.changes],
            "summary": self.summary(),
            "verification": self.verification.to_dict() if self.verification else None,
            "info": self.info,
        }

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.changes:
            out[c.action] = out.get(c.action, 0) + 1
        return out
