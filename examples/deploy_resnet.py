"""From a PyTorch model to a verified ONNX file and a latency table, in a few lines.

    python examples/deploy_resnet.py [OUT_DIR]

1. fold: BN disappears into the convs (every fold and leftover is reported);
2. export_onnx: fold + export + constant folding + ONNX checker + ONNX Runtime parity;
3. bench: ORT (best available provider) vs PyTorch eager, and the cost of a gn+ws conversion.
CLI equivalent:
    normsurgeon fold torchvision:resnet18 -o r18_folded.pt
    normsurgeon export torchvision:resnet18 -o r18.onnx --verify
    normsurgeon bench r18.onnx --batch-size 1,8
    normsurgeon convert torchvision:resnet18 --to gn+ws -o r18_gnws.pt
    normsurgeon bench torchvision:resnet18 --compare r18_gnws.pt --batch-size 1
"""
from __future__ import annotations

import os
import sys
import tempfile

import normsurgeon


def main(out_dir: str) -> None:
    shape = (1, 3, 224, 224)
    model = normsurgeon.load_model("torchvision:resnet18")

    folded = normsurgeon.fold(model, input_shape=shape, verify=True)
    print(f"fold: {folded.summary()} via {folded.path}, max rel error {folded.verification.max_rel_error:.1e}")

    path = os.path.join(out_dir, "resnet18.onnx")
    rep = normsurgeon.export_onnx(model, path, input_shape=shape, verify=True, force=True)
    print(f"export: {rep.nodes}; BatchNormalization {rep.batchnorm_nodes}, constant-only nodes "
          f"{rep.constant_nodes}; ORT vs PyTorch {rep.verification['max_rel_error']:.1e}; {rep.seconds['total']:.1f} s")

    gnws = normsurgeon.convert(model, "gn+ws", input_shape=shape).model
    b = normsurgeon.bench(model, compare=gnws, batch_sizes=(1,), runs=20, warmup=3, labels=("bn", "gn+ws"))
    for row in b.rows:
        print(f"  {row.model:6s} {row.backend:10s} batch {row.batch}: p50 {row.p50_ms:.1f} ms")
    for r in b.ratios:
        print(f"  gn+ws / bn on {r['backend']}: {r['p50_ratio']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as d:
            main(d)
