"""Where the time goes in the gn+ws ResNet-50 on ONNX Runtime's CPU EP: per-op-type kernel time.

    python benchmarks/ort_op_profile.py [--batch 1] [--threads 2] [--runs 8] [--bn]

Converts ResNet-50 to gn+ws (or, with --bn, keeps BN), exports it with normsurgeon (folded), runs it
under ORT's profiler and prints the kernel time per op type per run, summed over nodes. ORT's
optimized graph is what runs, so the NCHWc layout reorders it inserts show up as their own rows.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--bn", action="store_true", help="profile the BN-folded model instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import onnxruntime as ort

    import normsurgeon
    from tests.util import randomize_norm_stats

    shape = (args.batch, 3, 224, 224)
    model = randomize_norm_stats(normsurgeon.load_model("torchvision:resnet50"))
    if not args.bn:
        model = normsurgeon.convert(model, "gn+ws", input_shape=shape).model.eval()
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/model.onnx"
        normsurgeon.export_onnx(model, path, input_shape=shape)
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.enable_profiling = True
        so.profile_file_prefix = f"{d}/profile"
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
        for _ in range(3):
            sess.run(None, feed)
        for _ in range(args.runs):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    total, nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            total[op] += e["dur"]
            nodes[op] += 1
    calls = 3 + args.runs  # the warm-up runs are profiled too
    kind = "BN-folded" if args.bn else "gn+ws"
    print(f"ResNet-50 {kind}, ORT CPU EP, batch {args.batch}, {args.threads} threads; kernel time per run")
    print(f"{'op type':28s} {'ms/run':>8s} {'nodes':>6s}")
    for op, us in total.most_common():
        print(f"{op:28s} {us / calls / 1000:8.2f} {nodes[op] // calls:6d}")
    print(f"{'all kernels':28s} {sum(total.values()) / calls / 1000:8.2f}")


if __name__ == "__main__":
    main()
