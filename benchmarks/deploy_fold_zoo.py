"""fold + export + verify for every torchvision model that has BatchNorm (random weights, randomized
BN statistics). Prints one row per model: path, folds/leftovers, BN left, fold error (float32,
probe input), ORT-vs-PyTorch error, and the time of each phase.

    python benchmarks/deploy_fold_zoo.py [--size 224] [--exporter auto] [--max-params 150e6] [--only resnet50,...]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402


def bn_models(kinds) -> list[str]:
    names = []
    for kind in kinds:
        mod = getattr(torchvision.models, kind) if kind else torchvision.models
        names += [f"{kind}.{n}" if kind else n for n in torchvision.models.list_models(module=mod)]
    return names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--exporter", default="auto")
    ap.add_argument("--max-params", type=float, default=150e6)
    ap.add_argument("--only", default="")
    ap.add_argument("--segmentation", action="store_true", help="also torchvision.models.segmentation")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import normsurgeon
    from tests.util import randomize_norm_stats

    names = bn_models(["", "segmentation"] if args.segmentation else [""])
    if args.only:
        names = [n for n in names if n.split(".")[-1] in args.only.split(",")]
    print(f"input 1x3x{args.size}x{args.size}, exporter {args.exporter}, {args.threads} threads")
    hdr = (f"{'model':26s} {'path':6s} {'fold':>5s} {'aff':>4s} {'BNleft':>6s} {'fold err':>9s} {'ORT err':>9s} "
           f"{'fold s':>7s} {'export s':>8s} {'verify s':>8s} {'total s':>7s}")
    print(hdr)
    skipped = []
    for name in names:
        builder = torchvision.models.get_model_builder(name.split(".")[-1])
        kw = {"weights": None}
        if "inception" in name or "googlenet" in name:
            kw["init_weights"] = True
        if name.startswith("segmentation."):
            kw["weights_backbone"] = None
        model = builder(**kw).eval()
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            continue
        n_params = sum(p.numel() for p in model.parameters())
        if n_params > args.max_params:
            skipped.append(f"{name} ({n_params / 1e6:.0f}M params)")
            continue
        randomize_norm_stats(model)
        shape = (1, 3, args.size, args.size)
        t0 = time.perf_counter()
        try:
            res = normsurgeon.fold(model, input_shape=shape)
            t_fold = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as d:
                rep = normsurgeon.export_onnx(model, os.path.join(d, "m.onnx"), input_shape=shape, verify=True,
                                              exporter=args.exporter)
        except Exception as e:  # noqa: BLE001 - a row, not a crash
            print(f"{name:26s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        s = res.summary()
        left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in res.model.modules())
        sec = rep.seconds
        print(f"{name:26s} {res.path[:6]:6s} {s.get('folded', 0) + s.get('merged', 0):5d} {s.get('affine', 0):4d} "
              f"{left:6d} {res.verification.max_rel_error:9.1e} {rep.verification['max_rel_error']:9.1e} "
              f"{t_fold:7.2f} {sec.get('export', 0):8.2f} {sec.get('verify', 0):8.2f} {sec['total']:7.2f}",
              flush=True)
    if skipped:
        print("skipped (over --max-params):", ", ".join(skipped))


if __name__ == "__main__":
    main()
