"""The self-contained HTML page: run details, the figure as an embedded PNG (base64) and a table
sortable by clicking a column header (a few lines of inline JavaScript; no server, no network)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from normsurgeon.diagnosis.output import write_bytes
from normsurgeon.diagnosis.plot import figure_png

COLUMNS = (("depth", "#"), ("name", "layer"), ("kind", "norm"), ("activation", "activation"), ("shift_max", "shift max"),
           ("shift_mean", "shift mean"), ("log_var_max", "log var max"), ("collapse", "collapse"),
           ("collapse_pre", "collapse (norm out)"), ("flat", "constant ch."), ("instance_mean", "inst. means"),
           ("instance_std", "inst. stds"), ("dead", "dead ch."), ("cka", "CKA"), ("cosine", "cosine"),
           ("verdict", "verdict"), ("reason", "why"))

SORT_JS = """
document.querySelectorAll('th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], asc = th.dataset.asc !== '1';
    var rows = Array.from(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v, nx = parseFloat(x), ny = parseFloat(y);
      var numeric = th.dataset.text !== '1' && !isNaN(nx) && !isNaN(ny);
      var r = numeric ? nx - ny : x.localeCompare(y, undefined, {numeric: true});
      return asc ? r : -r;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    th.dataset.asc = asc ? '1' : '0';
  });
});
"""

STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}th{cursor:pointer;background:#f0f0f0}
td:nth-child(2),td:nth-child(3),td:nth-child(4),td:last-child{text-align:left}
.recalibrate{background:#fff3cd}.collapsed{background:#e2e3f5}.dead{background:#f8d7da}.diverged{background:#f5c6cb}
img{max-width:100%}"""


def _cell(v) -> tuple[str, str]:
    if v is None:
        return "", "-"
    if isinstance(v, float):
        return repr(v), f"{v:.3f}"
    return str(v), str(v)


def page(result, title: str = "normsurgeon diagnose", results: dict | None = None) -> str:
    """The HTML text for one result (the figure may overlay several: ``results``)."""
    png = base64.b64encode(figure_png(results or {"model": result})).decode("ascii")
    info = {k: v for k, v in result.report.items() if k != "layers"}
    text = ("name", "kind", "activation", "verdict", "reason")  # sorted as text (layer "3.bn1" is no number)
    head = "".join(('<th data-text="1">' if key in text else "<th>") + html.escape(label) + "</th>"
                   for key, label in COLUMNS)
    body = []
    for row in result.layers:
        cells = []
        for key, _ in COLUMNS:
            raw, shown = _cell(row.get(key))
            cells.append(f'<td data-v="{html.escape(raw)}">{html.escape(shown)}</td>')
        body.append(f'<tr class="{html.escape(row["verdict"])}">' + "".join(cells) + "</tr>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>"
            f"<pre>{html.escape(json.dumps(info, indent=1, default=str))}</pre>"
            f'<img alt="measures against layer depth" src="data:image/png;base64,{png}">'
            "<p>Click a column header to sort.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<script>{SORT_JS}</script></body></html>\n")


def write_html(result, path: str | Path, title: str = "normsurgeon diagnose", force: bool = True) -> Path:
    """Write the page atomically to ``path`` (an existing file only with ``force``)."""
    return write_bytes(Path(path), page(result, title).encode("utf-8"), force)
