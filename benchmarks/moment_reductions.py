"""Ways to get per-channel batch statistics on CPU: the cost behind recalibration's throughput.

    python benchmarks/moment_reductions.py [--threads N]

Rows are activation shapes from the digits CNN and ResNets. Columns (microseconds per call):
  eval BN        nn.BatchNorm2d in eval mode (the work a plain forward pass does)
  moment_sums    what recalibration adds per layer call: torch.var_mean (centred, one pass) and the
                 float64 sums made from it
  raw sums       a float32 sum and sum of squares (two passes; imprecise for large means), for scale
  train BN       nn.BatchNorm2d in train mode: one-pass statistics plus normalization; compare with
                 eval BN + moment_sums, which is what recalibration runs
"""
from __future__ import annotations

import argparse
import time

import torch

from normsurgeon.layers.moments import moment_sums

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
    print(f"torch threads: {args.threads}; microseconds per call")
    print(f"{'shape':>20s} {'eval BN':>9s} {'moment_sums':>12s} {'raw sums':>9s} {'train BN':>9s} "
          f"{'train/(eval+sums)':>18s}")
    with torch.no_grad():
        for shape in SHAPES:
            x = torch.randn(shape)
            bn_eval = torch.nn.BatchNorm2d(shape[1]).eval()
            bn_train = torch.nn.BatchNorm2d(shape[1], momentum=1.0).train()
            ev = per_call_us(lambda: bn_eval(x))
            ms = per_call_us(lambda: moment_sums(x))
            raw = per_call_us(lambda: (x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))))
            tr = per_call_us(lambda: bn_train(x))
            print(f"{str(shape):>20s} {ev:9.0f} {ms:12.0f} {raw:9.0f} {tr:9.0f} {tr / (ev + ms):18.2f}")


if __name__ == "__main__":
    main()
