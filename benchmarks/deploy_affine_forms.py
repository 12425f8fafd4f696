"""Per-channel affine leftovers on ORT CPU: depthwise 1x1 Conv (normsurgeon's default) vs Mul/Add.

DenseNet-121's 62 BN layers after concats cannot fold into a conv; they stay as one per-channel affine
each. This times both ONNX forms of the folded model, and torch's own dynamo export of the original.

    python benchmarks/deploy_affine_forms.py [--model densenet121] [--runs 40] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="densenet121")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--block", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import normsurgeon
    from deploy_r50 import torch_export
    from normsurgeon.deploy.bench import time_onnx
    from tests.util import randomize_norm_stats

    shape = (1, 3, args.size, args.size)
    model = randomize_norm_stats(normsurgeon.load_model(f"torchvision:{args.model}"))
    x = torch.randn(shape)
    with tempfile.TemporaryDirectory() as d:
        paths = {"torch-dynamo": f"{d}/t.onnx"}
        torch_export(model, x, paths["torch-dynamo"])
        for form in ("conv", "mul-add"):
            paths[f"ns-{form}"] = f"{d}/{form}.onnx"
            rep = normsurgeon.export_onnx(model, paths[f"ns-{form}"], input_shape=shape, channel_affine=form,
                                          verify=True)
            print(f"ns-{form}: {rep.nodes}, ORT max rel error {rep.verification['max_rel_error']:.1e}")
        rows = time_onnx(paths, x.numpy(), threads=args.threads, runs=args.runs, block=args.block)
    base = rows["torch-dynamo"]
    print(f"{args.model}, ORT CPU EP, batch 1, {args.size}x{args.size}, {args.threads} threads")
    for k, r in rows.items():
        print(f"{k:14s} p50 {r.p50_ms:8.2f} ms  min {r.min_ms:8.2f} ms  p50/torch-dynamo {r.p50_ms / base.p50_ms:.3f}")


if __name__ == "__main__":
    main()
