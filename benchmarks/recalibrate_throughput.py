"""Recalibration throughput vs a plain eval forward pass over the same data (goal: >= 0.85x).

    python benchmarks/recalibrate_throughput.py [--threads N] [--rounds R] [--only NAME]

Every round runs, in a shuffled order (so that this machine's drifts do not always favour the same
side), one eval pass and one ``normsurgeon.recalibrate`` call over the same batches under no_grad.
Each ratio is a pass's samples/s over the eval pass's *in the same round*; the table shows the
median ratio over R rounds and its range. "loop" is the statistics loop (``info["seconds"]``);
"call" is the whole call (deep copy of the model, finding the layers, loading statistics).
"""
from __future__ import annotations

import argparse
import random
import statistics
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
    return {"eval": plan.samples / (time.perf_counter() - start)}


def recal_pass(model, data, batch_size):
    start = time.perf_counter()
    res = normsurgeon.recalibrate(model, data, batch_size=batch_size)
    return {"loop": res.info["samples_per_s"], "call": res.info["samples"] / (time.perf_counter() - start)}


PASSES = (eval_pass, recal_pass)
COLUMNS = ("loop", "call")


def cases():
    torch.manual_seed(0)
    yield "digits CNN, digits 16x16, batch 64", train_digits_cnn(0), load_digits("train"), 64
    yield ("resnet18, 64x64 random, batch 32", torchvision.models.resnet18(weights=None).eval(),
           TensorData(torch.randn(256, 3, 64, 64)), 32)
    yield ("resnet50, 224x224 random, batch 32", torchvision.models.resnet50(weights=None).eval(),
           TensorData(torch.randn(96, 3, 224, 224)), 32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    order = random.Random(0)
    print(f"torch threads: {args.threads}; {args.rounds} rounds, passes in shuffled order; ratio = samples/s over "
          f"the same round's eval pass: median [min-max]")
    print(f"{'case':36s} {'eval samples/s':>15s} " + " ".join(f"{c:>19s}" for c in COLUMNS))
    for name, model, data, bs in cases():
        if args.only not in name:
            continue
        eval_pass(model, data, bs)  # warm-up
        rounds = []
        for _ in range(args.rounds):
            passes = list(PASSES)
            order.shuffle(passes)
            got = {}
            for p in passes:
                got.update(p(model, data, bs))
            rounds.append(got)
        cells = []
        for col in COLUMNS:
            r = [g[col] / g["eval"] for g in rounds]
            cells.append(f"{statistics.median(r):.2f} [{min(r):.2f}-{max(r):.2f}]")
        e = statistics.median(g["eval"] for g in rounds)
        print(f"{name:36s} {e:15.1f} " + " ".join(f"{c:>19s}" for c in cells))


if __name__ == "__main__":
    main()
