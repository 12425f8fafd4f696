"""The corpus (tests/corpus_zoo.py) through every verb, network blocked: one model per torchvision
family in the default run, a seeded timm sample under ``slow``, MONAI and segmentation_models_pytorch
when installed (``pip install normsurgeon[corpus]``). Each: inspect; convert gn+ws and frozen with
verify; fold with verify, no BatchNorm left; export with ONNX Runtime verification, or one clean
refusal where the exporter cannot take the model (detection)."""
from __future__ import annotations

import math
import socket

import pytest
import torch

from tests import corpus_zoo as cz


@pytest.fixture
def offline(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def check(row: cz.Row, entry: cz.Entry) -> None:
    assert row.bn_before > 0, "a corpus model without BatchNorm tests nothing here"
    assert row.bn_after == 0
    assert row.recalibrated == row.bn_before
    assert row.fold_error <= 1e-5 and row.frozen_error <= 1e-5
    assert row.gnws_batch_independent
    assert row.compared == "output" or row.compared.startswith("features at ")
    if row.independent_error is not None:
        assert row.independent_error <= 1e-5
    if entry.export and row.export.startswith("torch.onnx cannot export"):
        assert entry.source == "timm"  # exporter limits are accepted for the sampled zoo only (volo)
    elif entry.export:
        assert row.export_error is not None and row.export_error <= 1e-4
    else:
        assert row.export.startswith("refused: ")
    assert not math.isnan(row.gnws_error)


@pytest.mark.parametrize("entry", cz.TORCHVISION, ids=[e.family for e in cz.TORCHVISION])
def test_torchvision_family(entry, offline):
    row = cz.run_verbs(entry)
    check(row, entry)
    if entry.family == "detection":  # random init keeps no box: verified on features, and it says so
        assert row.compared.startswith("features at roi_heads")
        assert row.path == "module-swap"


TIMM = cz.timm_entries()


@pytest.mark.slow
@pytest.mark.parametrize("entry", TIMM, ids=[e.name for e in TIMM])
def test_timm_sample(entry, offline):
    pytest.importorskip("timm")
    check(cz.run_verbs(entry), entry)


@pytest.mark.slow
def test_timm_sample_is_the_seeded_rule():
    pytest.importorskip("timm")
    import json

    from tests.corpus_select import LIST, N_FAMILIES, select

    committed = json.loads(LIST.read_text())
    assert len({d["family"] for d in committed}) == N_FAMILIES >= 15
    assert select() == committed


@pytest.mark.slow  # 3D UNets: the heaviest corpus entries
def test_monai(offline):
    pytest.importorskip("monai")
    rows = []
    for entry in cz.monai_entries():
        rows.append(cz.run_verbs(entry))
        check(rows[-1], entry)
    # BasicUNet: torch.fx traces it, but the graph fails at run time -> module-swap, said so
    assert rows[0].path == "module-swap" and "fails on the probe input" in rows[0].fallback


def test_segmentation_models_pytorch(offline):
    pytest.importorskip("segmentation_models_pytorch")
    for entry in cz.smp_entries():
        check(cz.run_verbs(entry), entry)
