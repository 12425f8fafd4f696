"""Choosing a group count that a channel count and input shape can actually carry."""
from __future__ import annotations

import math

MIN_GROUP_VALUES = 4  # below this a group's statistics are degenerate (1 value -> output 0)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_groups(
    channels: int, wanted: int, spatial: int | None = 1, min_values: int = MIN_GROUP_VALUES
) -> tuple[int, str]:
    """The divisor of ``channels`` nearest to ``wanted`` whose groups hold >= ``min_values`` values.

    ``spatial`` is the number of positions per channel seen on the probe input (1 for (N, C) input,
    None when unknown: then only divisibility is enforced). Returns (groups, note); the note is empty
    when ``wanted`` was used as is, else it says why the count changed (opacus#567, #390, #580).
    """
    if channels < 1:
        raise ValueError("channels must be positive")
    candidates = divisors(channels)
    if spatial is not None:
        fit = [g for g in candidates if (channels // g) * spatial >= min_values]
        candidates = fit or [1]
    best = min(candidates, key=lambda g: (abs(g - wanted), -g))
    if best == wanted:
        return best, ""
    reasons = []
    if channels % wanted:
        reasons.append(f"{channels} channels not divisible by {wanted}")
    if spatial is not None and wanted <= channels and channels % wanted == 0:
        reasons.append(
            f"{wanted} groups would hold {channels // wanted * spatial} value(s) each, "
            f"fewer than {min_values}"
        )
    elif spatial is not None and (channels // best) * spatial < min_values:
        reasons.append("input too small for any grouping")
    if wanted > channels:
        reasons.append(f"only {channels} channels")
    return best, f"groups {wanted} -> {best}: " + "; ".join(reasons or ["nearest usable divisor"])


def spatial_size(input_shape: tuple[int, ...] | None) -> int | None:
    if input_shape is None or len(input_shape) < 2:
        return None
    return math.prod(input_shape[2:]) if len(input_shape) > 2 else 1
