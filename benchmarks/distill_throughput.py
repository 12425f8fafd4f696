"""Cost of a distill step vs a plain supervised training step of the same student at the same batch.

A distill step (``normsurgeon.distillation.loop.train``, the code ``distill`` runs) = teacher forward
without gradients + student forward/backward on the KL loss (plus the layer-wise term with
``--feature-weight W``; the tool's default is outputs only) + AdamW. The supervised step = student
forward/backward on cross-entropy with labels + AdamW, same batch and data order. Rounds alternate
(distill, supervised, distill, ...) so a busy machine slows both alike; each round times ``--steps``
steps; the table gives the median and range of per-step times and of the per-round ratio.

    python benchmarks/distill_throughput.py --model cnn --recipe gn+ws --rounds 7 --steps 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import normsurgeon  # noqa: E402
from examples.digits_resnet import digits_resnet  # noqa: E402
from normsurgeon.calibrate.data import load_digits  # noqa: E402
from normsurgeon.calibrate.digits_cnn import digits_cnn  # noqa: E402
from normsurgeon.distillation.api import DEFAULTS  # noqa: E402
from normsurgeon.distillation.loop import BatchOrder, LoopConfig, make_optimizer, train  # noqa: E402


def distill_round(student, teacher, data, cfg) -> float:
    opt = make_optimizer(student, cfg)
    t0 = time.perf_counter()
    train(student, teacher, data, cfg, torch.device("cpu"), torch.float32, optimizer=opt, start_step=0,
          config={}, record={})
    return (time.perf_counter() - t0) / cfg.steps


def supervised_round(student, data, cfg) -> float:
    opt = make_optimizer(student, cfg)
    order = BatchOrder(len(data), cfg.batch_size, cfg.seed)
    student.eval()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        x, y = data.take(order.indices(step))
        loss = F.cross_entropy(student(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / cfg.steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("cnn", "resnet"), default="cnn")
    ap.add_argument("--recipe", default="gn+ws")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--feature-weight", type=float, default=DEFAULTS["feature_weight"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = (digits_cnn() if args.model == "cnn" else digits_resnet()).eval()
    student = normsurgeon.convert(teacher, to=args.recipe, input_shape=(2, 1, 16, 16)).model
    teacher.requires_grad_(False)
    data = load_digits("train")
    cfg = LoopConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-4, weight_decay=0.0, warmup=1, seed=0,
                     loss="auto", temperature=1.0, features=args.feature_weight)
    distill_round(student, teacher, data, LoopConfig(**{**cfg.__dict__, "steps": 3}))  # warm-up
    supervised_round(student, data, LoopConfig(**{**cfg.__dict__, "steps": 3}))
    d, s = [], []
    for _ in range(args.rounds):
        d.append(distill_round(student, teacher, data, cfg))
        s.append(supervised_round(student, data, cfg))
    ratios = [a / b for a, b in zip(d, s)]
    print(f"# {args.model}, {args.recipe}, batch {args.batch_size}, {args.rounds} interleaved rounds x {args.steps} "
          f"steps, feature weight {args.feature_weight:g}, {args.threads} thread(s)")
    print("| step | median ms | range ms |")
    print("|---|---|---|")
    for name, v in (("distill", d), ("supervised", s)):
        print(f"| {name} | {1000 * statistics.median(v):.1f} | {1000 * min(v):.1f}-{1000 * max(v):.1f} |")
    print(f"| ratio distill/supervised | {statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} |")


if __name__ == "__main__":
    main()
