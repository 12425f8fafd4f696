"""The PNG figure: one panel per measure against layer depth (matplotlib, the ``[plot]`` extra).

Several results can share one figure (one line each, e.g. before/after recalibration, or ``ln`` vs
``ln+pn``); layers are placed by their position among the norm layers in forward order.
"""
from __future__ import annotations

import io
from pathlib import Path

from normsurgeon.diagnosis import verdicts as V
from normsurgeon.diagnosis.output import need_matplotlib, write_bytes

# verdict thresholds drawn as dotted lines (a log variance ratio beyond either line is stale)
LIMITS = {"BN staleness: mean shift": (V.STALE_SHIFT,), "BN staleness: log variance ratio": (V.STALE_LOG_VAR, -V.STALE_LOG_VAR),
          "Channel collapse": (V.COLLAPSE,), "Dead / constant channels": (V.DEAD_SHARE,),
          "Similarity to teacher": (V.DIVERGED_CKA,)}

# (panel id, title, [(row key, line label)], y label)
PANELS = (
    ("staleness", "BN staleness: mean shift", [("shift_max", "worst channel"), ("shift_mean", "channel mean")],
     "|mu_data - mu_run| / sigma_run"),
    ("log_var", "BN staleness: log variance ratio", [("log_var_max", "worst channel"), ("log_var_mean", "channel mean |.|")],
     "log(var_data / var_run)"),
    ("collapse", "Channel collapse", [("collapse", "after activation"), ("collapse_pre", "norm output")],
     "constant share of power"),
    ("instance", "Instance variability", [("instance_mean", "per-sample means"), ("instance_std", "per-sample stds")],
     "share of pooled variance"),
    ("dead", "Dead / constant channels", [("dead", "dead"), ("flat", "constant")], "fraction of channels"),
    ("similarity", "Similarity to teacher", [("cka", "linear CKA"), ("cosine", "cosine")], "similarity"),
)


def figure_png(results: dict, title: str = "", panels: tuple[str, ...] | None = None) -> bytes:
    """PNG bytes of the figure for ``{label: DiagnoseResult}``; panels with no data are left out, and
    ``panels`` (ids: staleness, log_var, collapse, instance, dead, similarity) picks some."""
    need_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    chosen = [p[1:] for p in PANELS if panels is None or p[0] in panels]
    panels = [p for p in chosen if any(r.get(k) is not None for res in results.values()
                                       for r in res.layers for k, _ in p[1])]
    last = max((r["depth"] for res in results.values() for r in res.layers), default=0)
    if not panels:  # nothing measured (e.g. no layer reached): one empty panel rather than no figure
        panels = [chosen[0] if chosen else PANELS[2][1:]]
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 3.2 * rows), squeeze=False)
    styles = ("-", "--")
    for ax, (ptitle, keys, ylabel) in zip(axes.flat, panels):
        for ci, (label, res) in enumerate(results.items()):
            color = f"C{ci}"
            for si, (key, what) in enumerate(keys):
                pts = [(r["depth"], r[key]) for r in res.layers if r.get(key) is not None]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                name = what if len(results) == 1 else f"{label}: {what}"
                ax.plot(xs, ys, styles[si % 2], marker="o", ms=3, color=color if len(results) > 1 else f"C{si}",
                        label=name)
        for i, y in enumerate(LIMITS.get(ptitle, ())):
            ax.axhline(y, color="0.5", ls=":", lw=1, label="verdict threshold" if i == 0 else None)
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel("norm layer (forward order)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.5, last + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_png(results: dict, path: str | Path, title: str = "", panels: tuple[str, ...] | None = None,
              force: bool = True) -> Path:
    """Write the figure atomically to ``path`` (an existing file only with ``force``)."""
    return write_bytes(Path(path), figure_png(results, title, panels), force)
