"""Noise-aware BN recalibration on real data: the eta = 0.05 / 0.1 / 0.2 table in the README.

    python examples/noise_aware_digits.py [--chips N]

Trains the acceptance CNN (normsurgeon.calibrate.digits_cnn: 3 conv-BN-ReLU, scikit-learn digits
upsampled to 16x16, trained briefly), then for each noise level reports top-1 test accuracy
averaged over N simulated chips (noise instances never used for calibration):

- noisy: the trained statistics under noise
- clean recal: statistics re-estimated without noise (what stale statistics alone account for)
- fixed: statistics re-estimated on the very chip it is evaluated on (``--noise-mode fixed``)
- resample: one set of statistics from fresh noise per batch (``--noise-mode resample``), evaluated
  on unseen chips
"""
from __future__ import annotations

import argparse

import torch

import normsurgeon
from normsurgeon.calibrate.data import load_digits
from normsurgeon.calibrate.digits_cnn import train_digits_cnn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chips", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = train_digits_cnn(args.seed)
    train, test = load_digits("train"), load_digits("test")
    chips = range(1000, 1000 + args.chips)

    def acc(m, spec=None, seed=0):
        return normsurgeon.evaluate(m, test, noise=spec, noise_seed=seed)["accuracy"]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs)

    clean_recal = normsurgeon.recalibrate(model, train).model
    print(f"clean test accuracy: {acc(model):.3f} ({len(test)} test images, {len(train)} calibration images)")
    print("| eta | noisy | clean recal | fixed (same chip) | resample (unseen chips) |")
    print("|---|---|---|---|---|")
    for eta in (0.05, 0.1, 0.2):
        spec = f"weight:{eta}"
        noisy = mean(acc(model, spec, s) for s in chips)
        cr = mean(acc(clean_recal, spec, s) for s in chips)
        fixed = mean(acc(normsurgeon.recalibrate(model, train, noise=spec, noise_seed=s).model, spec, s)
                     for s in list(chips)[: max(1, args.chips // 4)])
        any_chip = normsurgeon.recalibrate(model, train, noise=spec, noise_mode="resample", noise_seed=0).model
        res = mean(acc(any_chip, spec, s) for s in chips)
        print(f"| {eta:g} | {noisy:.3f} | {cr:.3f} | {fixed:.3f} | {res:.3f} |")


if __name__ == "__main__":
    main()
