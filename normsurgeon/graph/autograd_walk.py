"""The autograd graph of one forward, read forward: for every node reachable from the outputs, the
nodes that consume its result (one entry per use, so a node used twice by one op is listed twice)."""
from __future__ import annotations


def users_of(roots) -> dict[int, list]:
    """``{id(node): [consumer nodes]}`` over the graph reachable from ``roots`` (output ``grad_fn``s).
    Keyed by ``id``: hold a reference to the roots while the map is in use."""
    users: dict[int, list] = {}
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for nxt, _ in getattr(node, "next_functions", ()):
            if nxt is not None:
                users.setdefault(id(nxt), []).append(node)
                stack.append(nxt)
    return users
