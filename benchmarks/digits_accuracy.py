"""Test accuracy on real handwriting (scikit-learn's bundled 8x8 digits) for BN and the
batch-independent recipes, at batch sizes 2 and 32.

Every method trains the same small CNN (built with BatchNorm, then converted with
``normsurgeon.convert``; tool defaults, nothing tuned per method) with the same schedule: SGD momentum
0.9, lr = 0.1 * B / 32 (linear scaling, the same rule for every method), cosine decay, weight decay
1e-4, the same epochs and the same He (kaiming-normal) conv init. ``enorm`` is the CNN without normalization (conv biases) trained with
``normsurgeon.training.EqualizeCallback`` (one ENorm sweep after every SGD step, c = 1.1, momentum
buffers rescaled); ``none`` is that network with plain SGD, for reference. ``cbn``, ``bkn`` and ``iebn``
keep batch statistics in training (cross-iteration BN with its default window 8 and 100 burn-in
iterations, Batch Kalman Norm, instance-enhancement BN); their rows measure how they cope at batch 2.

Run (about 6 minutes on one CPU thread with the defaults):

    python benchmarks/digits_accuracy.py --epochs 6 --seeds 3 --threads 1
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

METHODS = ("bn", "gn", "gn+ws", "ln+pn", "gn+pn", "bcn", "bgn", "cbn", "bkn", "iebn", "enorm", "none")


def make_cnn(norm: bool = True) -> nn.Module:
    def block(cin, cout):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=not norm)]
        if norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU())
        return layers

    model = nn.Sequential(
        *block(1, 32), *block(32, 64), nn.MaxPool2d(2),
        *block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    for m in model.modules():  # He init for every method (the no-norm nets do not train with torch's default)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    idx_tr, idx_te = train_test_split(range(len(y)), test_size=0.25, random_state=seed, stratify=d.target)
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


def build(method: str, seed: int) -> nn.Module:
    import normsurgeon

    torch.manual_seed(seed)
    if method in ("enorm", "none"):
        return make_cnn(norm=False)
    model = make_cnn(norm=True)
    if method == "bn":
        return model
    return normsurgeon.convert(model, method, input_shape=(2, 1, 8, 8)).model


def train_eval(method: str, batch: int, seed: int, epochs: int, data) -> float:
    from normsurgeon.training import EqualizeCallback

    xtr, ytr, xte, yte = data
    model = build(method, seed).train()
    lr = 0.1 * batch / 32
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(ytr) / batch)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    cb = EqualizeCallback(model, opt, c=1.1, input_shape=(2, 1, 8, 8)) if method == "enorm" else None
    g = torch.Generator().manual_seed(seed)
    lossf = nn.CrossEntropyLoss()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), batch):
            idx = perm[i:i + batch]
            if len(idx) < 2:
                continue
            loss = lossf(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if cb is not None:
                cb.step()
    model.eval()
    with torch.no_grad():
        pred = model(xte).argmax(1)
    return float((pred == yte).float().mean()) * 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch-sizes", default="2,32")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_digits_split()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t0 = time.time()
    results: dict[tuple[str, int], list[float]] = {}
    for method in methods:
        for b in batches:
            results[(method, b)] = [train_eval(method, b, s, args.epochs, data) for s in range(args.seeds)]
    print(f"digits (sklearn, 8x8, {len(data[1])} train / {len(data[3])} test), {args.epochs} epochs, "
          f"{args.seeds} seeds, test accuracy % (mean ± std); {time.time() - t0:.0f} s")
    print("| method | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for method in methods:
        cells = []
        for b in batches:
            r = results[(method, b)]
            sd = statistics.stdev(r) if len(r) > 1 else 0.0
            cells.append(f"{statistics.mean(r):.1f} ± {sd:.1f}")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
