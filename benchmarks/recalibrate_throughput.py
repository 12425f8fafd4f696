"""Recalibration throughput vs a plain eval forward pass over the same data (goal: >= 0.9x).

    python benchmarks/recalibrate_throughput.py [--threads N] [--rounds R]

Both sides iterate the same batches (same order, same gather from the dataset) under no_grad. Each
round times one eval pass, one ``normsurgeon.recalibrate`` call, and one call with the C kernel turned
off (``torch_only``: two torch reductions per layer, the fallback path), interleaved so that machine
noise hits all alike; the table shows medians over R rounds. "loop" is the statistics loop
(``info["seconds"]``); "call" is the whole call (deep copy of the model, loading statistics).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import normsurgeon
from normsurgeon.calibrate.data import TensorData, load_digits
from normsurgeon.calibrate.digits_cnn import train_digits_cnn
from normsurgeon.calibrate.plan import make_plan
from normsurgeon.native import moments as native


def eval_pass(model, data, batch_size):
    plan = make_plan(len(data), batch_size)
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(len(plan)):
            model(data.take(plan.indices(b))[0])
    return plan.samples / (time.perf_counter() - start)


def recal_pass(model, data, batch_size):
    start = time.perf_counter()
    res = normsurgeon.recalibrate(model, data, batch_size=batch_size)
    return res.info["samples_per_s"], res.info["samples"] / (time.perf_counter() - start), res.info["statistics_kernel"]


def torch_path_loop(model, data, batch_size):
    with native.torch_only():
        return recal_pass(model, data, batch_size)[0]


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
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads}; medians over {args.rounds} interleaved rounds; "
          f"C kernel: {'yes' if native.kernel() is not None else 'no: ' + native.why_not()}")
    print(f"{'case':36s} {'eval samples/s':>15s} {'loop':>9s} {'ratio':>6s} {'call':>9s} {'ratio':>6s} "
          f"{'loop, torch path':>17s} {'ratio':>6s}")
    for name, model, data, bs in cases():
        eval_pass(model, data, bs)  # warm-up
        ev, loop, call, plain = [], [], [], []
        for _ in range(args.rounds):
            ev.append(eval_pass(model, data, bs))
            lp, cl, kernel = recal_pass(model, data, bs)
            loop.append(lp)
            call.append(cl)
            plain.append(torch_path_loop(model, data, bs))
        e, lp, cl, pl = (statistics.median(v) for v in (ev, loop, call, plain))
        print(f"{name:36s} {e:15.1f} {lp:9.1f} {lp / e:6.2f} {cl:9.1f} {cl / e:6.2f} {pl:17.1f} {pl / e:6.2f}")
        print(f"{'':36s} statistics kernel: {kernel}")


if __name__ == "__main__":
    main()
