"""Ways to get per-channel batch statistics on CPU: the cost behind recalibration's throughput.

    python benchmarks/moment_reductions.py [--threads N]

Rows are activation shapes from the digits CNN and ResNets. Columns (microseconds per call):
  eval BN        nn.BatchNorm2d in eval mode (the work a plain forward pass does)
  moment_sums    recalibration's torch path: a sum and a sum of squares, float64 pooling
  C kernel       recalibration's default path on CPU float32: normsurgeon/native/moments.c, one read
                 for both sums (and the batch mean / variance written out)
  in-place BN    recalibration's normalization where the input is used by nothing else: the same
                 values as eval BN, written over the input in one C pass (no output allocated)
  var_mean       torch.var_mean over (N, H, W): PyTorch's one-pass (Welford) reduction
  train BN       nn.BatchNorm2d in train mode: one-pass statistics plus normalization; compare with
                 eval BN + moment_sums, which is what recalibration runs
"""
from __future__ import annotations

import argparse
import time

import torch

from normsurgeon.layers.moments import moment_sums
from normsurgeon.native.moments import ChannelSums, InPlaceNorm, kernel, why_not

SHAPES = [(64, 16, 16, 16), (64, 32, 8, 8), (64, 64, 4, 4), (32, 64, 56, 56), (32, 256, 56, 56),
          (32, 512, 7, 7)]


def per_call_us(fn, budget_s: float = 0.3) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s or n < 3:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads}; microseconds per call"
          + ("" if kernel() is not None else f"; no C kernel: {why_not()}"))
    print(f"{'shape':>20s} {'eval BN':>9s} {'moment_sums':>12s} {'C kernel':>9s} {'in-place BN':>12s} {'var_mean':>9s} {'train BN':>9s} "
          f"{'train/(eval+sums)':>18s}")
    with torch.no_grad():
        for shape in SHAPES:
            x = torch.randn(shape)
            bn_eval = torch.nn.BatchNorm2d(shape[1]).eval()
            bn_train = torch.nn.BatchNorm2d(shape[1], momentum=1.0).train()
            ev = per_call_us(lambda: bn_eval(x))
            ms = per_call_us(lambda: moment_sums(x))
            c = shape[1]
            sums = ChannelSums(torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64),
                               torch.zeros(c), torch.zeros(c))
            ck = per_call_us(lambda: sums(x)) if kernel() is not None else float("nan")
            norm = InPlaceNorm(bn_eval)  # running mean 0, var 1: x stays bounded however often it runs
            ip = per_call_us(lambda: norm(x)) if kernel() is not None else float("nan")
            vm = per_call_us(lambda: torch.var_mean(x, dim=(0, 2, 3), correction=0))
            tr = per_call_us(lambda: bn_train(x))
            print(f"{str(shape):>20s} {ev:9.0f} {ms:12.0f} {ck:9.0f} {ip:12.0f} {vm:9.0f} {tr:9.0f} {tr / (ev + ms):18.2f}")


if __name__ == "__main__":
    main()
