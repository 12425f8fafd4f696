"""Recalibration throughput vs a plain eval forward pass over the same data (goal: >= 0.9x).

    python benchmarks/recalibrate_throughput.py [--threads N] [--repeats R]

Both sides iterate the same batches (same order, same gather from the dataset) under no_grad; the
recalibration figure is its statistics loop (``info["seconds"]``) and, separately, the whole call
(deep copy, verification forward, loading the statistics). Best of R runs each.
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

import normsurgeon
from normsurgeon.calibrate.data import TensorData, load_digits
from normsurgeon.calibrate.digits_cnn import train_digits_cnn
from normsurgeon.calibrate.plan import make_plan


def eval_pass(model, data, batch_size):
    plan = make_plan(len(data), batch_size)
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(len(plan)):
            model(data.take(plan.indices(b))[0])
    return plan.samples / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [
        ("digits CNN, digits 16x16, batch 64", train_digits_cnn(0), load_digits("train"), 64),
        ("resnet18, 64x64 random, batch 32", torchvision.models.resnet18(weights=None).eval(),
         TensorData(torch.randn(256, 3, 64, 64)), 32),
    ]
    print(f"{'case':40s} {'eval samples/s':>15s} {'recal loop':>11s} {'ratio':>6s} {'recal call':>11s} {'ratio':>6s}")
    for name, model, data, bs in cases:
        ev = max(eval_pass(model, data, bs) for _ in range(args.repeats))
        loop, call = 0.0, 0.0
        for _ in range(args.repeats):
            t = time.perf_counter()
            res = normsurgeon.recalibrate(model, data, batch_size=bs)
            call = max(call, res.info["samples"] / (time.perf_counter() - t))
            loop = max(loop, res.info["samples_per_s"])
        print(f"{name:40s} {ev:15.0f} {loop:11.0f} {loop / ev:6.2f} {call:11.0f} {call / ev:6.2f}")


if __name__ == "__main__":
    main()
