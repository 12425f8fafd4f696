"""Acceptance on real data: digits 16x16, a 3-conv BN CNN trained briefly, eta = 0.1."""
import torch

import normsurgeon
from normsurgeon.calibrate.data import load_digits
from normsurgeon.calibrate.digits_cnn import train_digits_cnn

ETA = "weight:0.1"
UNSEEN = range(1000, 1008)  # evaluation chips: never drawn during recalibration


def test_noise_aware_recalibration_recovers_accuracy():
    model = train_digits_cnn(seed=0)
    train, test = load_digits("train"), load_digits("test")
    clean = normsurgeon.evaluate(model, test)["accuracy"]
    noisy = [normsurgeon.evaluate(model, test, noise=ETA, noise_seed=s)["accuracy"] for s in UNSEEN]
    assert clean >= 0.95
    assert sum(noisy) / len(noisy) <= clean - 0.15  # the noise hurts

    # fixed mode: recalibrate on the chip (same seed -> the same noise instance in evaluate)
    for seed in (1000, 1001):
        fixed = normsurgeon.recalibrate(model, train, noise=ETA, noise_mode="fixed", noise_seed=seed).model
        assert all(torch.equal(a, b) for a, b in zip(fixed.parameters(), model.parameters()))
        assert normsurgeon.evaluate(fixed, test, noise=ETA, noise_seed=seed)["accuracy"] >= 0.95

    # resample mode: one set of statistics, evaluated on unseen chips
    any_chip = normsurgeon.recalibrate(model, train, noise=ETA, noise_mode="resample", noise_seed=0).model
    res = [normsurgeon.evaluate(any_chip, test, noise=ETA, noise_seed=s)["accuracy"] for s in UNSEEN]
    assert sum(res) / len(res) >= 0.75
    assert sum(res) / len(res) > sum(noisy) / len(noisy)
