"""Accuracy and teacher agreement after ``convert`` and after ``distill``, on scikit-learn's digits.

Teachers are trained here with BN to convergence on ``digits:train`` (``examples/digits_resnet.py``'s
``train_teacher``: SGD, cosine lr to 0): the project's digits CNN (``normsurgeon.calibrate.digits_cnn``)
and a ResNet-18-width residual network on digits at 32x32 (``examples/digits_resnet.py``). Each
recipe converts the teacher, then ``normsurgeon.distill`` trains the student on the *inputs* of
``digits:train`` only (labels are withheld: the data passed is the tensor x), with the tool's defaults
(moment-init, then KL output matching on mixed-up inputs, AdamW, cosine; ``--feature-weight`` adds the
layer-wise term) at the given steps and batch; one row per
(model, recipe, seed), where the seed sets the data order. Accuracy and agreement (top-1 equal to the
teacher's) are measured on ``digits:test``. ``--inversion N`` adds data-free rows (``inversion:N``,
no real inputs at all). ``--no-init`` / ``--no-mixup`` rows measure those stages' effect.

    python benchmarks/distill_digits.py --model cnn --steps 1000 --seeds 3
    python benchmarks/distill_digits.py --model resnet --recipes gn+ws,ln,gn+ws+pn --steps 400 --seeds 3
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import normsurgeon  # noqa: E402
from examples.digits_resnet import digits_resnet, train_teacher  # noqa: E402
from normsurgeon.calibrate.data import load_digits  # noqa: E402
from normsurgeon.calibrate.digits_cnn import digits_cnn  # noqa: E402

CNN_RECIPES = "gn,gn+ws,ln,in,ln+pn,gn+pn,gn+ws+pn"
TEACHER_STEPS = {"cnn": 600, "resnet": 400}


def teacher_for(kind: str, cache: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = digits_cnn() if kind == "cnn" else digits_resnet()
    f = cache / f"teacher_{kind}.pt"
    if f.exists():
        model.load_state_dict(torch.load(f, weights_only=True))
        return model.eval()
    t0 = time.perf_counter()
    train_teacher(model, steps=TEACHER_STEPS[kind], seed=0)
    print(f"# trained the {kind} teacher in {time.perf_counter() - t0:.0f} s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), f)
    return model.eval()


def scores(model, teacher, test) -> tuple[float, float, float]:
    """Test accuracy, top-1 agreement with the teacher, and KL(teacher || student) at temperature 1 (mean
    over test samples): how close the whole output distribution is, not only its top class."""
    with torch.no_grad():
        s_out, t_out = model.eval()(test.x), teacher(test.x)
    s, t = s_out.argmax(1), t_out.argmax(1)
    kl = torch.nn.functional.kl_div(s_out.log_softmax(1), t_out.log_softmax(1), reduction="batchmean", log_target=True)
    return float((s == test.y).float().mean()), float((s == t).float().mean()), float(kl)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("cnn", "resnet"), default="cnn")
    ap.add_argument("--recipes", default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds FIRST .. FIRST + SEEDS - 1")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--temperature", type=float, default=None,
                    help="softmax temperature of the KL loss (default: the tool's)")
    ap.add_argument("--no-init", action="store_true", help="skip the moment-init stage (ablation)")
    ap.add_argument("--no-mixup", action="store_true", help="no input mixup (ablation)")
    ap.add_argument("--feature-weight", type=float, default=None,
                    help="weight of the layer-wise term (default: the tool's; 0 = outputs only)")
    ap.add_argument("--inversion", type=int, default=0, help="data-free rows with inversion:N instead of digits:train")
    ap.add_argument("--inv", action="append", default=[], metavar="KEY=VALUE",
                    help="a synthesis setting for --inversion (iterations, lr, ce, tv, l2, jitter, first_bn, "
                         "clamp=LO,HI); repeatable")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=".bench_cache")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipes = (args.recipes or (CNN_RECIPES if args.model == "cnn" else "gn+ws,ln,gn+ws+pn")).split(",")
    teacher = teacher_for(args.model, Path(args.cache))
    test, train_x = load_digits("test"), load_digits("train").x
    t_acc = scores(teacher, teacher, test)[0]
    data = f"inversion:{args.inversion}" if args.inversion else train_x
    inv_opts = {}
    for item in args.inv:
        key, _, val = item.partition("=")
        inv_opts[key] = tuple(float(v) for v in val.split(",")) if key == "clamp" else \
            (int(val) if key in ("iterations", "batch_size", "jitter") else float(val))
    print(f"# {args.model} teacher (BN) test accuracy {100 * t_acc:.2f}%; distill data "
          f"{'inversion:%d' % args.inversion if args.inversion else 'digits:train inputs (no labels)'}; "
          f"steps {args.steps}, batch {args.batch_size}, lr {args.lr:g}, init {'off' if args.no_init else 'on'}, "
          f"mixup {'off' if args.no_mixup else 'on'}, "
          f"feature weight {'default' if args.feature_weight is None else args.feature_weight}, "
          f"temperature {'default' if args.temperature is None else format(args.temperature, 'g')}, "
          f"{'synthesis ' + str(inv_opts) + ', ' if inv_opts else ''}"
          f"{args.threads} thread(s)")
    print("| model | recipe | seed | converted acc | converted agree | distilled acc | distilled agree | "
          "acc - teacher (pts) | test KL | steps | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for recipe in recipes:
        student = normsurgeon.convert(teacher, to=recipe, input_shape=(2, 1, 16, 16)).model
        c_acc, c_agree, _ = scores(student, teacher, test)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            t0 = time.perf_counter()
            res = normsurgeon.distill(student, teacher, data, steps=args.steps, batch_size=args.batch_size,
                                      lr=args.lr, seed=seed, init=not args.no_init, mixup=not args.no_mixup, input_shape=(1, 1, 16, 16),
                                      **({} if args.feature_weight is None else {"feature_weight": args.feature_weight}),
                                      **({} if args.temperature is None else {"temperature": args.temperature}),
                                      inversion_options=inv_opts or None)
            sec = time.perf_counter() - t0
            acc, agree, kl = scores(res.model, teacher, test)
            print(f"| {args.model} | {recipe} | {seed} | {100 * c_acc:.2f} | {100 * c_agree:.2f} | {100 * acc:.2f} | "
                  f"{100 * agree:.2f} | {100 * (acc - t_acc):+.2f} | {kl:.4f} | {args.steps} | {sec:.0f} |", flush=True)


if __name__ == "__main__":
    main()
