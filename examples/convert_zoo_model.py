"""Convert a zoo model's BatchNorm layers and save the result (the core of normsurgeon).

    python examples/convert_zoo_model.py                      # torchvision:resnet18 -> gn+ws
    python examples/convert_zoo_model.py timm:efficientnet_b0 frozen out.pt

Same as ``normsurgeon convert MODEL --to RECIPE -o OUT``: load, convert, print every change, check
batch independence, save a manifest that loads back without --trust-pickle.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import normsurgeon


def main(spec: str = "torchvision:resnet18", recipe: str = "gn+ws", out: str | None = None) -> None:
    model = normsurgeon.load_model(spec)  # random init: nothing is downloaded
    result = normsurgeon.convert(model, recipe, input_shape=(2, 3, 64, 64))
    for c in result.changes:
        print(f"{c.action:12s} {c.target:30s} {c.before:28s} -> {c.after:24s} {c.detail}")
    v = result.verification
    print(f"path: {result.path}; {result.summary()}; max rel change vs original {v.max_rel_error:.2e}; "
          f"batch-independent in eval: {v.batch_independent}")

    out_path = Path(out) if out else Path(tempfile.mkdtemp()) / "converted.pt"
    normsurgeon.save_model(result.model, out_path, force=True)
    back = normsurgeon.load_model(str(out_path))  # rebuilt from the manifest, weights-only
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        same = torch.equal(back(x), result.model.eval()(x))
    print(f"saved {out_path}; reloads identically: {same}")


if __name__ == "__main__":
    main(*sys.argv[1:])
