"""ResNet-50 on ONNX Runtime (CPU EP): normsurgeon's deploy path against torch's own export, and the
cost of a gn+ws conversion in each GroupNorm graph form.

    python benchmarks/deploy_r50.py [--runs 60] [--batch 1] [--threads 2]

Rows (all timed in rotation in one process, so machine load hits them alike):
  torch-dynamo   torch.onnx.export(dynamo=True) of the original model (BN folded by the exporter)
  ns-bn          normsurgeon export (fold + export + optimize) of the same model
  ns-gnws-nchw   convert --to gn+ws, then normsurgeon export with groupnorm="nchw" (the 4-D form of
                 deploy/gn_forms.py, affine as depthwise 1x1 Conv)
  ns-gnws-conv   same, default InstanceNorm GroupNorm form, affine as depthwise 1x1 Conv
  ns-gnws-in     same, InstanceNorm form and the exporter's Mul/Add affine (--channel-affine mul-add)
  torch-gnws     torch.onnx.export(dynamo=True) of the gn+ws model as is (WS unfolded)
Targets: ns-bn / torch-dynamo <= 1.03; ns-gnws / ns-bn <= 1.25 on ORT CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402


def torch_export(model, x, path):
    import logging

    logging.disable(logging.WARNING)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=20, external_data=False, verbose=False)


def reorder_count(path, threads):
    """ReorderInput/ReorderOutput nodes left in ORT's optimized graph (NCHWc layout breaks)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.optimized_model_filepath = path + ".opt.onnx"
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sum(n.op_type in ("ReorderInput", "ReorderOutput") for n in onnx.load(path + ".opt.onnx").graph.node)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--block", type=int, default=10, help="runs per model in rotation (1: run-by-run, spinning off)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import normsurgeon
    from normsurgeon.deploy.bench import time_onnx
    from tests.util import randomize_norm_stats

    shape = (args.batch, 3, args.size, args.size)
    model = randomize_norm_stats(normsurgeon.load_model("torchvision:resnet50"))
    gnws = normsurgeon.convert(model, "gn+ws", input_shape=shape).model.eval()
    x = torch.randn(shape)
    timings = {}
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        t = time.perf_counter()
        torch_export(model, x, f"{d}/torch.onnx")
        timings["torch dynamo export (s)"] = time.perf_counter() - t
        paths["torch-dynamo"] = f"{d}/torch.onnx"
        fold_times = []
        for _ in range(3):
            t = time.perf_counter()
            normsurgeon.fold(model, input_shape=shape)
            fold_times.append(time.perf_counter() - t)
        res = normsurgeon.fold(model, input_shape=shape)
        timings["fold R50, best of 3 incl. verification (s)"] = min(fold_times)
        timings["fold R50, pass alone (s)"] = res.info["fold_seconds"]
        for label, m, kw in [("ns-bn", model, {}), ("ns-gnws-nchw", gnws, {"groupnorm": "nchw"}),
                             ("ns-gnws-conv", gnws, {"groupnorm": "instancenorm", "channel_affine": "conv"}),
                             ("ns-gnws-in", gnws, {"groupnorm": "instancenorm", "channel_affine": "mul-add"})]:
            rep = normsurgeon.export_onnx(m, f"{d}/{label}.onnx", input_shape=shape, verify=True, **kw)
            timings[f"{label} export total (s)"] = rep.seconds["total"]
            timings[f"{label} ORT max rel error"] = rep.verification["max_rel_error"]
            paths[label] = f"{d}/{label}.onnx"
            timings[f"{label} ORT Reorder nodes"] = reorder_count(paths[label], args.threads)
        torch_export(gnws, x, f"{d}/torch-gnws.onnx")
        paths["torch-gnws"] = f"{d}/torch-gnws.onnx"
        rows = time_onnx(paths, x.numpy(), provider="cpu", warmup=args.warmup, runs=args.runs,
                         threads=args.threads, block=args.block)
    base_t, base_n = rows["torch-dynamo"], rows["ns-bn"]
    mode = f"blocks of {args.block} in rotation" if args.block > 1 else "interleaved run by run"
    print(f"ResNet-50, ORT CPU EP, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, "
          f"{args.runs} runs per graph, {mode}")
    print(f"{'graph':14s} {'p50 ms':>8s} {'min ms':>8s} {'p90 ms':>8s} {'p50/torch':>10s} {'p50/ns-bn':>10s} "
          f"{'min/ns-bn':>10s}")
    for k, r in rows.items():
        print(f"{k:14s} {r.p50_ms:8.2f} {r.min_ms:8.2f} {r.p90_ms:8.2f} {r.p50_ms / base_t.p50_ms:10.3f} "
              f"{r.p50_ms / base_n.p50_ms:10.3f} {r.min_ms / base_n.min_ms:10.3f}")
    for k, v in timings.items():
        print(f"{k}: {v:.3g}")


if __name__ == "__main__":
    main()
