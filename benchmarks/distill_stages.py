"""Each distill stage's effect, measured against plain output matching, on the digits CNN teacher.

Variants per recipe (one seed, the same teacher and steps): ``plain`` = KL output matching only (no
moment-init, no mixup); ``+init`` adds the moment-init stage; ``+mixup`` adds input mixup;
``default`` = both (the tool's default); ``mse`` = the default with MSE on logits instead of KL.
Columns: agreement with the teacher on the distill data's first 2048 samples after moment-init (the
report's stage figure), and test accuracy / agreement on ``digits:test`` after training.

    python benchmarks/distill_stages.py --recipes gn,gn+ws,ln,in --steps 300
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import normsurgeon  # noqa: E402
from benchmarks.distill_digits import scores, teacher_for  # noqa: E402
from normsurgeon.calibrate.data import load_digits  # noqa: E402

VARIANTS = {"plain": dict(init=False, mixup=False), "+init": dict(init=True, mixup=False),
            "+mixup": dict(init=False, mixup=True), "default": dict(init=True, mixup=True),
            "mse": dict(init=True, mixup=True, loss="mse")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="gn,gn+ws,ln,in")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=".bench_cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    teacher = teacher_for("cnn", Path(args.cache))
    test, train_x = load_digits("test"), load_digits("train").x
    print(f"# cnn teacher test accuracy {100 * scores(teacher, teacher, test)[0]:.2f}%; {args.steps} steps, "
          f"batch 64, lr 3e-3, seed {args.seed}, digits:train inputs only")
    print("| recipe | variant | converted agree (train) | after init agree (train) | test acc | test agree | seconds |")
    print("|---|---|---|---|---|---|---|")
    for recipe in args.recipes.split(","):
        student = normsurgeon.convert(teacher, to=recipe).model
        for name, kw in VARIANTS.items():
            t0 = time.perf_counter()
            res = normsurgeon.distill(student, teacher, train_x, steps=args.steps, seed=args.seed, **kw)
            sec = time.perf_counter() - t0
            first = res.report["stages"][0]
            init = f"{100 * first['agreement_end']:.1f}" if first["name"] == "moment-init" else "-"
            acc, agree, _ = scores(res.model, teacher, test)
            print(f"| {recipe} | {name} | {100 * res.report['before']['agreement']:.1f} | {init} | {100 * acc:.2f} | "
                  f"{100 * agree:.2f} | {sec:.0f} |", flush=True)


if __name__ == "__main__":
    main()
