"""Replay recorded structural surgery on a freshly built model (used when loading a manifest)."""
from __future__ import annotations

from typing import Any

from normsurgeon.errors import ModelSpecError


def replay(model: Any, steps: list[dict]) -> Any:
    """Apply each recorded step; steps marked ``replay: False`` changed only tensor values."""
    import normsurgeon

    for step in steps:
        verb, args = step.get("verb"), dict(step.get("args") or {})
        if args.pop("replay", True) is False:
            continue
        fn = getattr(normsurgeon, verb, None)
        if fn is None or verb.startswith("_"):
            raise ModelSpecError(
                f"the file records surgery {verb!r}, which this normsurgeon cannot replay; upgrade normsurgeon"
            )
        model = fn(model, **args, verify=False).model
    return model
