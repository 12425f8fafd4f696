"""Train the project's digits CNN with BatchNorm on ``digits:train`` (a few seconds on a CPU) and save
it as a normsurgeon file: a trained BN teacher to try ``convert`` and ``distill`` on.

    python examples/digits_teacher.py out/digits_bn.pt
"""
from __future__ import annotations

import sys

import normsurgeon as ns
from normsurgeon.calibrate.digits_cnn import train_digits_cnn


def main(out: str = "digits_bn.pt") -> None:
    path = ns.save_model(train_digits_cnn(seed=0), out, force=True)
    print(f"wrote {path}: the digits CNN with BatchNorm, trained on digits:train")


if __name__ == "__main__":
    main(*sys.argv[1:2])
