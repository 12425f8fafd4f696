"""The model corpus: models nobody here wrote, run through every verb (tests/test_corpus*.py and
benchmarks/corpus_table.py share this file).

Each entry builds a real model with random weights (nothing downloads): one per torchvision family,
a seeded timm sample (tests/corpus_select.py) and, when installed, MONAI and
segmentation_models_pytorch models. ``run_verbs`` runs inspect, convert (gn+ws and frozen, verified),
fold (verified) and export (verified, where the exporter supports the model) and returns the figures
docs/corpus.md tabulates.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

BN = nn.modules.batchnorm._BatchNorm


@dataclass
class Entry:
    name: str  # what the table calls it
    family: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    export: bool = True  # False: export must refuse it with one error (detection)
    source: str = "torchvision"


# ------------------------------------------------------------------------------------- torchvision
def tv(name: str, **kw) -> Callable[[], nn.Module]:
    def build():
        if not kw:
            from normsurgeon.model_io import load_model

            return load_model(f"torchvision:{name}")
        import torchvision

        return torchvision.models.get_model(name, weights=None, weights_backbone=None, **kw).eval()
    return build


def fasterrcnn_small() -> nn.Module:
    """torchvision's Faster R-CNN (MobileNetV3-FPN) with its resize set to 64 px: the real model, small input."""
    return tv("fasterrcnn_mobilenet_v3_large_320_fpn", min_size=64, max_size=64)()


TORCHVISION = [
    Entry("resnet18", "classification", tv("resnet18"), (2, 3, 32, 32)),
    Entry("fasterrcnn_mobilenet_v3_large_320_fpn (64 px)", "detection", fasterrcnn_small, (2, 3, 64, 64),
          export=False),
    Entry("lraspp_mobilenet_v3_large", "segmentation", tv("lraspp_mobilenet_v3_large"), (2, 3, 64, 64)),
    Entry("r3d_18", "video", tv("r3d_18"), (2, 3, 2, 16, 16)),
    Entry("quantized_mobilenet_v2 (float, quantize=False)", "quantizable", tv("quantized_mobilenet_v2"),
          (2, 3, 32, 32)),
]


# ------------------------------------------------------------------------------------------- timm
def timm_entries() -> list[Entry]:
    from tests.corpus_select import LIST

    out = []
    for d in json.loads(LIST.read_text()):
        size = tuple(d["input_size"])
        out.append(Entry(d["model"], d["family"], _timm(d["model"]), (1, *size), source="timm"))
    return out


def _timm(name: str):
    def build():
        from normsurgeon.model_io import load_model

        return load_model(f"timm:{name}")
    return build


# ------------------------------------------------------------------------------------- extras
def monai_entries() -> list[Entry]:
    def basic_unet():
        from monai.networks.nets import BasicUNet

        return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(8, 8, 16, 32, 64, 8),
                         norm="batch").eval()

    def unet():
        from monai.networks.nets import UNet

        return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
                    num_res_units=1, norm="batch").eval()

    return [Entry("monai BasicUNet (3D, BatchNorm3d)", "3D segmentation", basic_unet, (1, 1, 32, 32, 32),
                  source="monai"),
            Entry("monai UNet (3D, residual units, BatchNorm3d)", "3D segmentation", unet, (1, 1, 32, 32, 32),
                  source="monai")]


def smp_entries() -> list[Entry]:
    def unet():
        import segmentation_models_pytorch as smp

        return smp.Unet("resnet18", encoder_weights=None, classes=2).eval()

    return [Entry("smp Unet (resnet18 encoder)", "segmentation", unet, (1, 3, 64, 64),
                  source="segmentation_models_pytorch")]


# ------------------------------------------------------------------------------------------- verbs
@dataclass
class Row:
    name: str
    family: str
    source: str
    shape: tuple[int, ...]
    path: str = ""  # fx or module-swap (fold's)
    fallback: str = ""  # why not fx
    bn_before: int = 0
    bn_after: int = 0
    affines: int = 0
    affine_reasons: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    fold_error: float = float("nan")
    frozen_error: float = float("nan")
    gnws_error: float = float("nan")
    gnws_batch_independent: bool | None = None
    compared: str = ""
    export: str = ""  # "ORT rel err ..." or the refusal
    export_error: float | None = None
    seconds: float = 0.0
    recalibrated: int = 0  # BN layers recalibrate re-estimated on random data
    independent_error: float | None = None  # fold, on an input no pass saw (None: output uninformative)


def _generic(reason: str) -> str:
    """A leftover's reason without the layer names in it, so one kind of reason is listed once."""
    import re

    return re.sub(r"\s*\([^()]*\.[^()]*\)", "", reason)


def _independent_error(model: nn.Module, folded: nn.Module, shape) -> float | None:
    from normsurgeon.graph.verify import flatten_outputs, output_error, uninformative

    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g) * 1.5 + 0.2
    with torch.no_grad():
        ref, got = model(x), folded(x)
    if uninformative(flatten_outputs(ref)) is not None:
        return None
    return output_error(ref, got)[1]


def run_verbs(entry: Entry, randomize: bool = True) -> Row:
    """Every verb on ``entry`` through the public API; any exception other than the expected export
    refusal propagates (the CLI would print it as an internal error)."""
    import time

    import normsurgeon
    from normsurgeon.deploy.export import ExportError
    from tests.util import randomize_norm_stats

    t0 = time.perf_counter()
    torch.manual_seed(0)  # the same random weights on every run
    model = entry.build().eval()
    if randomize:
        randomize_norm_stats(model)
    row = Row(entry.name, entry.family, entry.source, entry.shape)
    row.bn_before = sum(isinstance(m, BN) for m in model.modules())

    rep = normsurgeon.inspect(model, input_shape=entry.shape)
    assert sum(isinstance(model.get_submodule(l.name), BN) for l in rep.layers) == row.bn_before

    gnws = normsurgeon.convert(model, "gn+ws", input_shape=entry.shape, verify=True)
    row.gnws_error = gnws.verification.max_rel_error
    row.gnws_batch_independent = gnws.verification.batch_independent
    frozen = normsurgeon.convert(model, "frozen", input_shape=entry.shape, verify=True)
    row.frozen_error = frozen.verification.max_rel_error

    data = torch.rand((8, *entry.shape[1:]), generator=torch.Generator().manual_seed(3))
    recal = normsurgeon.recalibrate(model, data, batch_size=4, shuffle=False, verify=True)
    row.recalibrated = recal.count("recalibrated")

    fold = normsurgeon.fold(model, input_shape=entry.shape, verify=True)
    row.path = fold.path
    row.fallback = next((c.detail for c in fold.changes if c.action == "fallback"), "")
    row.bn_after = fold.info["remaining_batchnorm"]
    affines = [c for c in fold.changes if c.action == "affine"]
    row.affines = len(affines)
    row.affine_reasons = sorted({_generic(c.detail.split("; ")[0]) for c in affines})
    row.kept = sorted({c.detail for c in fold.changes if c.action == "kept"})
    row.fold_error = fold.verification.max_rel_error
    row.compared = fold.verification.compared
    row.independent_error = _independent_error(model, fold.model, entry.shape)

    if entry.export:  # TorchScript first (faster), then dynamo; a clean ExportError from both is recorded
        failures = []
        for exporter in ("torchscript", "dynamo"):
            try:
                with tempfile.TemporaryDirectory() as d:
                    r = normsurgeon.export_onnx(model, Path(d) / "m.onnx", input_shape=(1, *entry.shape[1:]),
                                                exporter=exporter, verify=True)
            except ExportError as e:
                failures.append(str(e))
                continue
            assert r.batchnorm_nodes == 0
            row.export_error = r.verification["max_rel_error"]
            row.export = f"ok ({r.exporter})"
            break
        else:
            row.export = "torch.onnx cannot export it: " + " / ".join(f.split(" (")[1].split(")")[0] for f in failures)
    else:
        try:
            with tempfile.TemporaryDirectory() as d:
                normsurgeon.export_onnx(model, Path(d) / "m.onnx", input_shape=(1, *entry.shape[1:]), verify=True)
        except ExportError as e:
            row.export = f"refused: {str(e).split(':', 1)[1].split(';')[0].strip()}"
        else:
            raise AssertionError(f"export of {entry.name} was expected to be refused")
    row.seconds = time.perf_counter() - t0
    return row
