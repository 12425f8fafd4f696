"""Recalibration throughput vs a plain eval forward pass over the same data (goal: >= 0.9x).

    python benchmarks/recalibrate_throughput.py [--threads N] [--rounds R]

Both sides iterate the same batches (same order, same gather from the dataset) under no_grad. Each
round times one eval pass and then one ``normsurgeon.recalibrate`` call, interleaved so that machine
noise hits both alike; the table shows medians over R rounds. "recal loop" is the statistics loop
(``info["seconds"]``); "recal call" is the whole call (deep copy of the model, loading statistics).
"sums only" is the eval pass with nothing but the statistics reductions hooked in front of each BN:
the floor for exact statistics computed this way.
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
from normsurgeon.layers.moments import moment_sums


def eval_pass(model, data, batch_size):
    plan = make_plan(len(data), batch_size)
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(len(plan)):
            model(data.take(plan.indices(b))[0])
    return plan.samples / (time.perf_counter() - start)


def sums_only_pass(model, data, batch_size):
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_pre_hook(lambda mod, args: moment_sums(args[0]) and None) for m in bns]
    try:
        return eval_pass(model, data, batch_size)
    finally:
        for h in hooks:
            h.remove()


def recal_pass(model, data, batch_size):
    start = time.perf_counter()
    res = normsurgeon.recalibrate(model, data, batch_size=batch_size)
    return res.info["samples_per_s"], res.info["samples"] / (time.perf_counter() - start)


def cases():
    torch.manual_seed(0)
    yield "digits CNN, digits 16x16, batch 64", train_digits_cnn(0), load_digits("train"), 64
    yield ("resnet18, 64x64 random, batch 32", torchvision.models.resnet18(weights=None).eval(),
           TensorData(torch.randn(256, 3, 64, 64)), 32)
    yield ("resnet50, 224x224 random, batch 32", torchvision.models.resnet50(weights=None).eval(),
           TensorData(torch.randn(64, 3, 224, 224)), 32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads}; medians over {args.rounds} interleaved rounds")
    print(f"{'case':36s} {'eval samples/s':>15s} {'sums only':>10s} {'ratio':>6s} {'recal loop':>11s} {'ratio':>6s} "
          f"{'recal call':>11s} {'ratio':>6s}")
    for name, model, data, bs in cases():
        eval_pass(model, data, bs)  # warm-up
        ev, sums, loop, call = [], [], [], []
        for _ in range(args.rounds):
            ev.append(eval_pass(model, data, bs))
            sums.append(sums_only_pass(model, data, bs))
            lp, cl = recal_pass(model, data, bs)
            loop.append(lp)
            call.append(cl)
        e, sm, lp, cl = (statistics.median(v) for v in (ev, sums, loop, call))
        print(f"{name:36s} {e:15.1f} {sm:10.1f} {sm / e:6.2f} {lp:11.1f} {lp / e:6.2f} {cl:11.1f} {cl / e:6.2f}")


if __name__ == "__main__":
    main()
