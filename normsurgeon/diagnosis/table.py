"""The terminal table (rich): one row per norm layer, sized to fit 80 columns."""
from __future__ import annotations

STYLES = {"ok": "green", "recalibrate": "yellow", "collapsed": "magenta", "dead": "red", "diverged": "bold red"}


def _f(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _kind(kind: str) -> str:
    for long, short in (("BatchNorm", "BN"), ("GroupNorm", "GN"), ("LayerNorm", "LN"), ("InstanceNorm", "IN")):
        kind = kind.replace(long, short)
    return kind


def layers_table(result, title: str = "diagnose"):
    from rich import box
    from rich.table import Table

    teacher = any(r.get("cka") is not None for r in result.layers)
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), expand=False, title_justify="left")
    table.add_column("layer", overflow="ellipsis", no_wrap=True, max_width=18)
    table.add_column("norm", overflow="ellipsis", no_wrap=True, max_width=9)
    for head in ("shift", "logvar", "coll", "flat", "inst", "dead") + (("cka",) if teacher else ()):
        table.add_column(head, justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for r in result.layers:
        cells = [r["name"] or "(root)", _kind(r["kind"]), _f(r.get("shift_max")),
                 _f(r.get("log_var_max")), _f(r.get("collapse")), _f(r.get("flat")), _f(r.get("instance_mean")),
                 _f(r.get("dead"))]
        if teacher:
            cells.append(_f(r.get("cka")))
        v = r["verdict"]
        cells.append(f"[{STYLES.get(v, 'white')}]{v}[/]")
        table.add_row(*cells)
    return table


LEGEND = ("shift: worst |mu_data-mu_run|/sigma_run; logvar: worst log(var_data/var_run); coll: constant "
          "share of power after the activation; flat: constant channels; inst: between-sample share of "
          "variance; dead: ~always-zero channels")
