"""Checks that need no model and no torch: run first by every command, so that a typo in a path, a
suffix or a flag value is reported at once (a command that imports torch first makes the user wait
seconds for the same line). Each raises the same error the full path would."""
from __future__ import annotations

import math
import os
from pathlib import Path

from normsurgeon.errors import DataError, ModelSpecError, NoiseSpecError, RecipeError

MODEL_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt")


def looks_like_path(spec: str) -> bool:
    return spec.endswith(MODEL_SUFFIXES + (".onnx",)) or os.sep in spec or spec.startswith(".")


def model_spec(spec: str) -> str:
    """A MODEL argument that can be loaded as far as can be told without loading it."""
    spec = (spec or "").strip()
    if not spec:
        raise ModelSpecError("no MODEL given: pass a file path or a spec like torchvision:resnet18")
    path = Path(spec)
    if path.is_dir():
        raise ModelSpecError(f"{spec} is a directory; pass a model file or a spec like timm:resnet50")
    if not path.exists() and looks_like_path(spec):
        raise ModelSpecError(f"model file not found: {spec}")
    if not path.exists() and ":" not in spec:
        raise ModelSpecError(
            f"cannot read MODEL {spec!r}: use a file path, torchvision:NAME, timm:NAME or package.module:callable")
    return spec


def shape(text: str | None, flag: str = "--input-shape") -> tuple[int, ...] | None:
    """``N,C,H,W`` (or ``NxCxHxW``) as a tuple of positive ints; None for no value."""
    if text is None or text == "":
        return None
    try:
        dims = tuple(int(t) for t in str(text).replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise ModelSpecError(f"bad {flag} {text!r}: write integers like 1,3,224,224") from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise ModelSpecError(f"bad {flag} {text!r}: need at least N,C with positive sizes")
    return dims


def data_spec(spec: str) -> str:
    """A DATA argument that names something that exists (a file, a folder, or ``digits[:split]``)."""
    text = str(spec or "").strip()
    if not text:
        raise DataError("no DATA given: pass a .npz/.pt file, an image folder, or digits")
    path = Path(text)
    if not path.exists() and text.split(":")[0] not in ("digits", "inversion"):
        raise DataError(f"DATA not found: {text}; pass a .npz/.pt file, an image folder, or digits")
    return text


def positive(value: float | int | None, flag: str, integer: bool = False) -> None:
    if value is None:
        return
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
    if integer and not isinstance(value, int):
        bad = True
    if bad:
        raise RecipeError(f"bad {flag} {value!r}: use a finite positive {'integer' if integer else 'number'}")


def noise(text: str | None) -> None:
    """The ``weight:ETA`` grammar of ``--noise``, checked without building the noise model."""
    if text is None:
        return
    kind, sep, eta = str(text).partition(":")
    try:
        ok = kind == "weight" and sep and math.isfinite(float(eta)) and float(eta) >= 0
    except ValueError:
        ok = False
    if not ok:
        raise NoiseSpecError(f"bad --noise {text!r}: use weight:ETA with ETA >= 0, e.g. weight:0.1")


INIT_CHOICES = ("revisited",)  # convert --init (passes/train_options.py applies them)
INPUT_NORM_CHOICES = ("bn", "dain")  # convert --input-norm


def input_norm_kind(value) -> str | None:
    """``False``/None -> None, ``True`` -> "bn", else the lower-cased name (RecipeError if unknown)."""
    if value is None or value is False:
        return None
    if value is True:
        return "bn"
    kind = str(value).strip().lower()
    if kind not in INPUT_NORM_CHOICES:
        raise RecipeError(f"unknown --input-norm {value!r}; valid: {', '.join(INPUT_NORM_CHOICES)}")
    return kind


def check_init(init: str | None) -> None:
    if init is not None and init not in INIT_CHOICES:
        raise RecipeError(f"unknown --init {init!r}; valid: {', '.join(INIT_CHOICES)}")


def threads(value: int | None) -> None:
    """--threads: a positive integer, or left out."""
    from normsurgeon.threads import check

    check(value)
