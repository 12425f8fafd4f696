"""Where a model came from, what surgery it went through, and the input it was run on.

normsurgeon saves a model as a *manifest* (:mod:`normsurgeon.manifest`): the source spec, the list of
steps applied, the input shape last used, and a weights-only state_dict. Loading rebuilds the source
from its spec, replays the structural steps, and loads the tensors, so chains like
``convert -> fold -> export`` never unpickle anything.
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
    setattr(model, ATTR, {"source": spec, "steps": [], "input_shape": None})


def restore(model: Any, manifest: Any) -> None:
    """Give a model rebuilt from a file that file's history (a validated :class:`Manifest`)."""
    setattr(model, ATTR, {"source": manifest.source, "steps": copy.deepcopy(manifest.steps),
                          "input_shape": copy.deepcopy(manifest.input_shape)})


def record(new_model: Any, old_model: Any, verb: str, args: dict[str, Any]) -> None:
    """Give ``new_model`` the history of ``old_model`` plus one step (``args`` must be JSON-able). An
    ``input_shape`` among the arguments becomes the model's recorded input shape."""
    p = get(old_model) or {"source": None, "steps": [], "input_shape": None}
    p["steps"].append({"verb": verb, "args": args})
    if args.get("input_shape"):
        p["input_shape"] = [int(d) for d in args["input_shape"]]
    setattr(new_model, ATTR, p)


def input_shape(model: Any) -> tuple[int, ...] | None:
    """The input shape recorded for ``model`` (given to or found by an earlier verb), or None."""
    shape = (getattr(model, ATTR, None) or {}).get("input_shape")
    return tuple(shape) if shape else None


def rebuildable(model: Any) -> bool:
    p = getattr(model, ATTR, None)
    return bool(p and p.get("source"))


def manifest(model: Any) -> dict | None:
    """The manifest to save with ``model`` (current format), or None when it has no source spec."""
    from normsurgeon.manifest import FORMAT_VERSION

    p = get(model)
    if not p or not p.get("source"):
        return None
    return {"format_version": FORMAT_VERSION, "source": p["source"], "input_shape": p.get("input_shape"),
            "steps": p["steps"]}
