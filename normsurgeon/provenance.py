"""Where a model came from and what surgery it went through.

normsurgeon saves a model as a *manifest*: the source spec, the list of structural steps applied, and
a weights-only state_dict. Loading rebuilds the source from its spec, replays the steps, and loads the
tensors, so chains like ``convert -> fold -> export`` never unpickle anything.
"""
from __future__ import annotations

import copy
from typing import Any

ATTR = "_normsurgeon_provenance"


def get(model: Any) -> dict | None:
    p = getattr(model, ATTR, None)
    return copy.deepcopy(p) if p is not None else None


def set_source(model: Any, spec: str | None) -> None:
    """Mark a freshly loaded model. ``spec=None``: not rebuildable (came from a pickle or from code)."""
    setattr(model, ATTR, {"source": spec, "steps": []})


def record(new_model: Any, old_model: Any, verb: str, args: dict[str, Any]) -> None:
    """Give ``new_model`` the history of ``old_model`` plus one step (``args`` must be JSON-able)."""
    p = get(old_model) or {"source": None, "steps": []}
    p["steps"].append({"verb": verb, "args": args})
    setattr(new_model, ATTR, p)


def rebuildable(model: Any) -> bool:
    p = getattr(model, ATTR, None)
    return bool(p and p.get("source"))
