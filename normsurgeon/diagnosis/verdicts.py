"""One word per layer, from its measures. Thresholds (documented in docs/diagnose.md):

- ``diverged``: the layer's statistics are not finite (NaN/Inf on this data), or, with a teacher,
  the linear CKA to the matching teacher layer is below ``DIVERGED_CKA``;
- ``dead``: at least ``DEAD_SHARE`` of the channels after the activation are ~always zero;
- ``recalibrate``: a layer with running estimates whose worst channel has a mean shift above
  ``STALE_SHIFT`` running standard deviations, or a log variance ratio beyond ``STALE_LOG_VAR``
  (a factor 1.5 in variance either way);
- ``collapsed``: the channel-wise constant component holds at least ``COLLAPSE`` of the block
  output's power, or at least ``FLAT_SHARE`` of its channels are constant;
- ``ok``: none of these.

The first rule that applies wins, in the order above.
"""
from __future__ import annotations

import math

DIVERGED_CKA = 0.8
DEAD_SHARE = 0.5
STALE_SHIFT = 0.3
STALE_LOG_VAR = math.log(1.5)
COLLAPSE = 0.8
FLAT_SHARE = 0.5

VERDICTS = ("diverged", "dead", "recalibrate", "collapsed", "ok")


def thresholds() -> dict[str, float]:
    return {"diverged_cka": DIVERGED_CKA, "dead_share": DEAD_SHARE, "stale_shift": STALE_SHIFT,
            "stale_log_var": round(STALE_LOG_VAR, 4), "collapse": COLLAPSE, "flat_share": FLAT_SHARE}


def verdict(row: dict) -> tuple[str, str]:
    """``(verdict, reason)`` for one layer's measures (the keys of a report row)."""
    if not row.get("finite", True):
        return "diverged", "statistics are not finite on this data"
    cka = row.get("cka")
    if cka is not None and cka < DIVERGED_CKA:
        return "diverged", f"CKA to the teacher {cka:.2f} < {DIVERGED_CKA}"
    if row.get("dead", 0.0) >= DEAD_SHARE:
        return "dead", f"{row['dead']:.0%} of channels are ~always zero"
    shift, log_var = row.get("shift_max"), row.get("log_var_max")
    if shift is not None and shift > STALE_SHIFT:
        return "recalibrate", f"running mean off by {shift:.2f} running std"
    if log_var is not None and abs(log_var) > STALE_LOG_VAR:
        return "recalibrate", f"variance ratio {math.exp(log_var):.2f}x the running one"
    if row.get("collapse", 0.0) >= COLLAPSE:
        return "collapsed", f"{row['collapse']:.0%} of the power is channel-wise constant"
    if row.get("flat", 0.0) >= FLAT_SHARE:
        return "collapsed", f"{row['flat']:.0%} of channels are constant"
    return "ok", ""
