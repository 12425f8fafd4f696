"""The acceptance figures of ``diagnose`` (docs/diagnose.md): tables on stdout, PNGs under docs/img/.

(a) Stale BN under analog weight noise: the digits BN CNN (``train_digits_cnn(0)``, trained briefly on
    digits:train) under weight noise eta = 0.1 (fixed instance, seed 0), diagnosed on digits:test
    before and after ``recalibrate`` on digits:train with the same noise instance.
(b) Channel collapse: a small ResNet-style network (stem + 4 residual blocks, conv-BN-ReLU, He init),
    converted to ``ln`` and to ``ln+pn`` before training, trained for a few epochs on digits:train with
    the same schedule and seed (Adam, lr 2e-3, cosine decay, batch 32), diagnosed on digits:test.
(c) Teacher similarity: the trained digits CNN converted to ``gn+ws`` (no retraining), all layers and
    all but the first, diagnosed with the original as teacher; then, if this normsurgeon has
    ``distill``, the full conversion distilled from the teacher and diagnosed again.

Run (a few minutes on one CPU thread):

    python benchmarks/diagnose_figures.py --out docs/img
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

import normsurgeon as ns
from normsurgeon.calibrate.data import load_digits
from normsurgeon.calibrate.digits_cnn import train_digits_cnn
from normsurgeon.diagnosis.plot import write_png

NOISE, SEED = "weight:0.1", 0
COLS = ("shift_max", "log_var_max", "collapse", "collapse_pre", "flat", "instance_mean", "dead", "cka")


def table(title: str, result) -> None:
    print(f"\n{title}")
    print("| layer | norm | act | " + " | ".join(COLS) + " | verdict |")
    print("|---|---|---|" + "---:|" * len(COLS) + "---|")
    for r in result.layers:
        cells = ["-" if r.get(k) is None else f"{r[k]:.3f}" for k in COLS]
        print(f"| {r['name']} | {r['kind']} | {r['activation']} | " + " | ".join(cells) + f" | {r['verdict']} |")


# ------------------------------------------------------------------------------------------ (a)
def figure_noise(out: Path) -> None:
    model = train_digits_cnn(0)
    before = ns.diagnose(model, "digits:test", noise=NOISE, noise_seed=SEED)
    rec = ns.recalibrate(model, "digits:train", noise=NOISE, noise_seed=SEED).model
    after = ns.diagnose(rec, "digits:test", noise=NOISE, noise_seed=SEED)
    acc = [ns.evaluate(m, "digits:test", noise=NOISE, noise_seed=SEED)["accuracy"] for m in (model, rec)]
    table(f"(a) digits BN CNN under {NOISE} (seed {SEED}), before recalibrate (test acc {acc[0]:.3f})", before)
    table(f"(a) after recalibrate with the same noise (test acc {acc[1]:.3f})", after)
    print(f"stale before: {len(before.flagged('recalibrate'))}/{len(before.layers)}, "
          f"after: {len(after.flagged('recalibrate'))}/{len(after.layers)}")
    write_png({"before recalibrate": before, "after recalibrate": after}, out / "diagnose_noise.png",
              title=f"digits BN CNN under {NOISE}: before / after recalibrate", panels=("staleness", "log_var"))


# ------------------------------------------------------------------------------------------ (b)
class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(x + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


def small_resnet(width: int = 32, blocks: int = 4) -> nn.Sequential:
    """conv3x3-BN-ReLU stem, ``blocks`` basic residual blocks (pre-add BN, ReLU after the add), GAP, linear."""
    model = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                          *[Block(width) for _ in range(blocks)], nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(width, 10))
    for m in model.modules():  # He init
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    return model


def train(model: nn.Module, epochs: int, seed: int = 0) -> nn.Module:
    train_set = load_digits("train")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * math.ceil(len(train_set) / 32)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_set), generator=g)
        for i in range(0, len(train_set), 32):
            x, y = train_set.take(order[i:i + 32])
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def figure_collapse(out: Path, epochs: int) -> None:
    results = {}
    for recipe in ("ln", "ln+pn"):
        torch.manual_seed(0)
        model = ns.convert(small_resnet(), recipe, input_shape=(2, 1, 16, 16)).model
        model = train(model, epochs)
        acc = ns.evaluate(model, "digits:test")["accuracy"]
        results[recipe] = r = ns.diagnose(model, "digits:test")
        table(f"(b) ResNet-style net, {recipe}, {epochs} epochs (test acc {acc:.3f})", r)
    for recipe, r in results.items():
        post = [x["collapse"] for x in r.layers]
        pre = [x["collapse_pre"] for x in r.layers]
        print(f"{recipe}: mean collapse after activation {sum(post) / len(post):.3f}, "
              f"at the norm output {sum(pre) / len(pre):.3f}")
    write_png(results, out / "diagnose_collapse.png", title=f"ResNet-style net on digits ({epochs} epochs): ln vs ln+pn",
              panels=("collapse", "instance"))


# ------------------------------------------------------------------------------------------ (c)
def figure_teacher(out: Path, distill_steps: int) -> None:
    teacher = train_digits_cnn(0)
    full = ns.convert(teacher, "gn+ws", input_shape=(2, 1, 16, 16)).model
    part = ns.convert(teacher, "gn+ws", input_shape=(2, 1, 16, 16), keep=("1",)).model
    results = {}
    print(f"\n(c) teacher: the BN CNN, test acc {ns.evaluate(teacher, 'digits:test')['accuracy']:.3f}")
    for label, m in (("gn+ws (all layers)", full), ("gn+ws (BN 1 kept)", part)):
        results[label] = r = ns.diagnose(m, "digits:test", teacher=teacher)
        acc = ns.evaluate(m, "digits:test")["accuracy"]
        table(f"(c) {label}, no retraining (test acc {acc:.3f}), teacher = the BN CNN", r)
    distill = getattr(ns, "distill", None)
    if distill is None:
        print("(c) distill: skipped (this normsurgeon has no distill yet)")
    else:
        t0 = time.time()
        student = distill(full, teacher, "digits:train", steps=distill_steps).model.eval()
        results["gn+ws after distill"] = r = ns.diagnose(student, "digits:test", teacher=teacher)
        acc = ns.evaluate(student, "digits:test")["accuracy"]
        table(f"(c) gn+ws after distill ({distill_steps} steps, {time.time() - t0:.0f} s; test acc {acc:.3f})", r)
    write_png(results, out / "diagnose_teacher.png", title="digits CNN converted to gn+ws vs its BN teacher",
              panels=("similarity", "collapse"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="a,b,c")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    parts = set(args.only.split(","))
    if "a" in parts:
        figure_noise(out)
    if "b" in parts:
        figure_collapse(out, args.epochs)
    if "c" in parts:
        figure_teacher(out, args.distill_steps)
    print(f"\n{time.time() - t0:.0f} s, torch {torch.__version__}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
