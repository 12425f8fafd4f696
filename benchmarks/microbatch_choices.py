"""The measurements behind two defaults in docs/recipes.md: BKN's gain q, and why CBN models want a
recalibration after a short run. Digits CNN (normsurgeon.calibrate.digits_cnn, 16x16 digits), batch 2,
plain SGD with momentum 0.9 at a constant lr, test accuracy on digits:test with the running statistics
the training left, and after ``normsurgeon.recalibrate`` on digits:train.

Run (about 2 minutes on one CPU thread):

    python benchmarks/microbatch_choices.py --seeds 1 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

# (label, recipe or None for BN, convert options, steps, lr, detach the CBN producers)
CONFIGS = [
    ("bn", None, {}, 150, 0.02, False),
    ("bkn gain 1 (= BN)", "bkn", {"bkn_gain": 1.0}, 150, 0.02, False),
    ("bkn gain 0.5 (default)", "bkn", {"bkn_gain": 0.5}, 150, 0.02, False),
    ("bkn gain 0.1 (authors' prior weight 0.9)", "bkn", {"bkn_gain": 0.1}, 150, 0.02, False),
    ("bn", None, {}, 300, 0.006, False),
    ("cbn:4, burn-in 10", "cbn:4", {"cbn_burnin": 10}, 300, 0.006, False),
    ("cbn:4, burn-in 10, no compensation", "cbn:4", {"cbn_burnin": 10}, 300, 0.006, True),
]


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def run(cfg, seed: int, train, test) -> tuple[float, float]:
    import normsurgeon
    from normsurgeon.calibrate.digits_cnn import digits_cnn
    from normsurgeon.layers import CrossIterationBatchNorm
    from normsurgeon.layers.bkn import clear_preceding

    _, recipe, opts, steps, lr, detach = cfg
    torch.manual_seed(seed)
    clear_preceding()
    model = digits_cnn()
    if recipe:
        model = normsurgeon.convert(model, recipe, input_shape=(2, 1, 16, 16), **opts).model
    if detach:
        for m in model.modules():
            if isinstance(m, CrossIterationBatchNorm):
                m.attach(None)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = train.take(torch.randint(len(train), (2,), generator=g))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    xt, yt = test.take(torch.arange(len(test)))
    before = accuracy(model, xt, yt)
    after = accuracy(normsurgeon.recalibrate(model, "digits:train").model, xt, yt)
    return before, after


def main() -> None:
    from normsurgeon.calibrate.data import load_digits

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_digits("train"), load_digits("test")
    t0 = time.time()
    rows = []
    for cfg in CONFIGS:
        res = [run(cfg, s, train, test) for s in range(args.seeds)]
        rows.append((cfg, statistics.mean(r[0] for r in res), statistics.mean(r[1] for r in res)))
    print(f"digits CNN, batch 2, SGD momentum 0.9, constant lr, {args.seeds} seed(s); test accuracy % "
          f"(mean over seeds); {time.time() - t0:.0f} s")
    print("| configuration | steps | lr | running statistics | after recalibrate |")
    print("|---|---|---|---|---|")
    for (label, _, _, steps, lr, _), a, b in rows:
        print(f"| {label} | {steps} | {lr:g} | {a:.1f} | {b:.1f} |")


if __name__ == "__main__":
    main()
