"""The corpus table of docs/corpus.md: every corpus model (tests/corpus_zoo.py: one per torchvision
family, the seeded timm sample, MONAI and segmentation_models_pytorch when installed) through inspect,
convert (gn+ws, frozen), fold and export, with the network blocked. Random weights, randomized BN
statistics. Prints a markdown table; a model that fails prints its error in the row.

    python benchmarks/corpus_table.py [--only NAME,...] [--skip-timm]
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402


def _block_network() -> None:
    def refuse(*a, **k):
        raise RuntimeError("network access attempted")

    socket.socket.connect = refuse
    torch.hub.load_state_dict_from_url = refuse


def entries(skip_timm: bool):
    from tests import corpus_zoo as cz

    out = list(cz.TORCHVISION)
    if not skip_timm:
        out += cz.timm_entries()
    for extra, fn in (("monai", cz.monai_entries), ("segmentation_models_pytorch", cz.smp_entries)):
        try:
            __import__(extra)
        except ImportError:
            print(f"<!-- {extra} not installed: its rows are left out -->")
            continue
        out += fn()
    return out


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1e}"


def _short(fallback: str) -> str:
    """The fallback reason up to its first sentence end, at most 110 characters."""
    text = fallback.split(". ")[0]
    return text if len(text) <= 110 else text[:107] + "..."


def row_md(r) -> str:
    why = "; ".join(r.affine_reasons) if r.affines else ""
    affines = f"{r.affines}" + (f" ({why})" if why else "")
    path = r.path if r.path == "fx" else f"module-swap ({_short(r.fallback)})"
    export = r.export if r.export_error is None else f"{fmt(r.export_error)} {r.export.removeprefix('ok ')}"
    shape = "x".join(map(str, r.shape))
    return (f"| {r.name} | {r.family} | {shape} | {path} | {r.bn_before} -> {r.bn_after} | {affines} | "
            f"{fmt(r.fold_error)} | {fmt(r.independent_error)} | {r.compared} | {fmt(r.frozen_error)} | "
            f"{'yes' if r.gnws_batch_independent else 'no'} | {export} | {r.seconds:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated entry names (substring match)")
    ap.add_argument("--skip-timm", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    _block_network()
    from tests import corpus_zoo as cz

    only = [s for s in args.only.split(",") if s]
    print("| model | family | input | path | BN before -> after fold | leftover affines (why) | "
          "fold rel err (probe) | fold rel err (fresh input) | fold compared | frozen rel err | "
          "gn+ws batch-independent | export: ORT rel err | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for e in entries(args.skip_timm):
        if only and not any(o in e.name for o in only):
            continue
        try:
            print(row_md(cz.run_verbs(e)), flush=True)
        except Exception as ex:  # noqa: BLE001 - the table shows failures instead of hiding them
            tb = traceback.format_exception_only(type(ex), ex)[-1].strip()[:200]
            print(f"| {e.name} | {e.family} | | FAILED: {tb} | | | | | | | | | |", flush=True)


if __name__ == "__main__":
    main()
