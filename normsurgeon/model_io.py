"""Model specs, safe loading and atomic saving.

MODEL specs, the same for every verb:

- ``torchvision:NAME``            torchvision classification/segmentation/detection builder, random init
- ``timm:NAME``                   timm model, ``pretrained=False`` (never downloads)
- ``normsurgeon:NAME``            a model bundled with normsurgeon (``normsurgeon:digits_cnn``)
- ``package.module:callable``     a factory importable from the current directory or PYTHONPATH
- ``PATH`` to a file written by normsurgeon (``.pt`` manifest or ``.safetensors``): rebuilt from its
  source spec plus the recorded surgery (:mod:`normsurgeon.manifest`), tensors loaded weights-only.
  A file whose source is a ``package.module:callable`` factory is refused unless ``trust_code=True``:
  a file is data, and only the user's command line may ask for code to be imported.
- ``PATH`` to a ``torch.save(model)`` pickle: refused unless ``trust_pickle=True`` (it runs code)

``weights=FILE`` loads a state_dict (.pt/.pth weights-only, or .safetensors) into the built model.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from normsurgeon import provenance
from normsurgeon.errors import (
    DependencyError,
    ManifestError,
    ModelSpecError,
    UntrustedCodeError,
    UntrustedPickleError,
    did_you_mean,
    first_line,
)
from normsurgeon.manifest import FORMAT_VERSION, validate
from normsurgeon.publish import check_output, publish

FORMAT_KEY = "normsurgeon_format"
META_KEY = "normsurgeon_manifest"  # safetensors metadata key holding the JSON manifest
ZOOS = ("torchvision", "timm", "normsurgeon")  # sources a file may name freely: registry names only
BUNDLED = {"digits_cnn": ("normsurgeon.calibrate.digits_cnn", "digits_cnn")}  # normsurgeon:NAME models
_ZOO_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


# ----------------------------------------------------------------------------------------- loading

def load_model(spec: str, weights: str | os.PathLike | None = None, trust_pickle: bool = False,
               trust_code: bool = False):
    """Build or load the model named by ``spec`` (see module docstring); eval mode, on CPU.

    ``trust_pickle``: allow unpickling a full-module file (runs code stored in it). ``trust_code``:
    allow a normsurgeon file whose source is a ``package.module:callable`` factory to import it."""
    if not spec or not str(spec).strip():
        raise ModelSpecError("no MODEL given: pass a file path or a spec like torchvision:resnet18")
    spec = str(spec).strip()
    path = Path(spec)
    if path.exists():
        if path.is_dir():
            raise ModelSpecError(f"{spec} is a directory; pass a model file or a spec like timm:resnet50")
        model = _load_file(path, trust_pickle, trust_code)
    elif _looks_like_path(spec):
        raise ModelSpecError(f"model file not found: {spec}")
    else:
        model = build_from_spec(spec)
    if weights is not None:
        load_weights(model, weights)
    model.eval()
    return model


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".pt", ".pth", ".safetensors", ".bin", ".ckpt")) or os.sep in spec \
        or spec.startswith(".")


def build_from_spec(spec: str):
    """A freshly initialised model from a spec the user gave (no file involved)."""
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ModelSpecError(
            f"cannot read MODEL {spec!r}: use a file path, torchvision:NAME, timm:NAME or package.module:callable"
        )
    if kind in ZOOS and not _ZOO_NAME.fullmatch(name):
        raise ModelSpecError(f"bad {kind} model name {name!r}: use a registry name like resnet50 "
                             "(normsurgeon never downloads models or configs)")
    if kind == "normsurgeon":
        if name not in BUNDLED:
            raise ModelSpecError(f"unknown bundled model normsurgeon:{name}; bundled: "
                                 + ", ".join(f"normsurgeon:{n}" for n in BUNDLED))
        model = getattr(importlib.import_module(BUNDLED[name][0]), BUNDLED[name][1])()
    elif kind == "torchvision":
        model = _torchvision(name)
    elif kind == "timm":
        model = _timm(name)
    else:
        model = _factory(kind, name)
    provenance.set_source(model, spec)
    return model


def _torchvision(name: str):
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise ModelSpecError(
            f"unknown torchvision model {name!r}{did_you_mean(name, torchvision.models.list_models())}; list them "
            "with: python -c \"import torchvision; print(torchvision.models.list_models())\""
        ) from None
    # every weights* argument as None: detection/segmentation builders default weights_backbone to
    # ImageNet weights, which would download (or, offline, fail)
    import inspect

    params = inspect.signature(builder).parameters
    kwargs: dict[str, Any] = {p: None for p in params if p.startswith("weights")}
    base = name.removeprefix("quantized_")
    if base.startswith("inception") or base == "googlenet":
        kwargs["init_weights"] = True
        if base == "googlenet":
            kwargs["aux_logits"] = False
    return builder(**kwargs)


def _timm(name: str):
    try:
        import timm
    except ImportError:
        raise DependencyError("timm is not installed: pip install timm") from None
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid model" in str(e):
            raise ModelSpecError(
                f"unknown timm model {name!r}{did_you_mean(name, timm.list_models())}; list them with: "
                "python -c \"import timm; print(timm.list_models())\""
            ) from None
        raise


@contextlib.contextmanager
def cwd_importable():
    """The current directory on ``sys.path`` for the duration (only for code the user asked for)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _factory(module_name: str, attr: str):
    spec = f"{module_name}:{attr}"
    try:
        with cwd_importable():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ModelSpecError(
            f"cannot import {module_name!r} for MODEL {spec} ({e}); "
            "run from the directory holding it or add it to PYTHONPATH"
        ) from None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - the user's module failed (or exited) while importing
        raise ModelSpecError(f"importing {module_name} for MODEL {spec} failed: "
                             f"{type(e).__name__}: {first_line(e)}; fix the module") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        raise ModelSpecError(f"{module_name} has no callable {attr!r} to build the model{did_you_mean(attr, names)}")
    try:
        model = fn()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - the user's factory failed, needs arguments, or exited
        raise ModelSpecError(f"calling {spec}() failed: {type(e).__name__}: {first_line(e)}; "
                             "the spec must name a callable that builds the model with no arguments") from None
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ModelSpecError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module; "
                             "the spec must name a callable that builds the model with no arguments")
    return model


def _load_file(path: Path, trust_pickle: bool, trust_code: bool = False):
    if path.suffix == ".safetensors":
        tensors, meta = _read_safetensors(path)
        if META_KEY not in meta:
            raise ModelSpecError(
                f"{path} holds bare tensors, not a model: give the architecture as MODEL "
                f"(e.g. torchvision:resnet50) and pass this file with --weights"
            )
        try:
            raw = json.loads(meta[META_KEY])
        except ValueError:
            raise ManifestError(f"{path}: malformed manifest (not JSON); the file is damaged or was not "
                                "written by normsurgeon") from None
        return _rebuild(raw, tensors, path, trust_code)
    obj = _torch_load(path, weights_only=True, trust_pickle=trust_pickle)
    import torch

    if isinstance(obj, torch.nn.Module):  # only reachable through trust_pickle
        provenance.set_source(obj, None) if provenance.get(obj) is None else None
        return obj
    if isinstance(obj, dict) and FORMAT_KEY in obj:
        if set(obj) != {FORMAT_KEY, "manifest", "state_dict"} or not isinstance(obj[FORMAT_KEY], int):
            raise ManifestError(f"{path}: malformed normsurgeon file (expected keys {FORMAT_KEY}, manifest, "
                                "state_dict); the file is damaged or was not written by normsurgeon")
        return _rebuild(obj["manifest"], obj["state_dict"], path, trust_code)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelSpecError(
            f"{path} is a state_dict, not a model: give the architecture as MODEL "
            f"(e.g. torchvision:resnet50) and pass this file with --weights"
        )
    raise ModelSpecError(f"{path} does not hold a model normsurgeon can read ({type(obj).__name__})")


def _torch_load(path: Path, weights_only: bool, trust_pickle: bool = False):
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle of objects: a broken file
            raise ModelSpecError(f"cannot read {path}: the file is corrupt or not a torch file") from None
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{path} is a full pickle: loading it runs code stored in the file. "
                "If you trust its source, pass --trust-pickle (API: trust_pickle=True)"
            ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise ModelSpecError(f"cannot read {path}: the file is corrupt or not a torch file ({first_line(e)})") from None
    try:  # the user trusts the file: its classes may live next to it, as they did when it was saved
        with cwd_importable():
            return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise ModelSpecError(
            f"unpickling {path} needs module {e.name!r}, which is not importable from here: run from the "
            f"folder holding {e.name}.py (or its package), or add that folder to PYTHONPATH") from None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - arbitrary code ran; report it as a load failure
        raise ModelSpecError(f"unpickling {path} failed: {type(e).__name__}: {first_line(e)}") from None


def _mismatch_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
    return lines[0][:200] if lines else first_line(e)


def _read_safetensors(path: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelSpecError(f"cannot read {path}: not a valid safetensors file ({first_line(e)})") from None
    return tensors, meta


def _rebuild(raw: Any, state_dict: Any, path: Path, trust_code: bool):
    """Rebuild a model from a file's manifest: validated first, source checked for trust, structural
    steps replayed, tensors loaded weights-only."""
    import torch

    from normsurgeon.manifest import replay

    manifest = validate(raw, str(path))
    if not isinstance(state_dict, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise ManifestError(f"{path}: malformed normsurgeon file (its state_dict is not a mapping of names to "
                            "tensors); the file is damaged or was not written by normsurgeon")
    kind = manifest.source.partition(":")[0]
    if kind not in ZOOS and not trust_code:
        raise UntrustedCodeError(
            f"{path} is built by the factory {manifest.source}, code normsurgeon would import and run; "
            "if you trust the file and that code, pass --trust-code (API: trust_code=True)")
    model = build_from_spec(manifest.source)
    model = replay(model, manifest)
    _load_state(model, state_dict, str(path))
    provenance.restore(model, manifest)
    return model


def load_weights(model, weights: str | os.PathLike) -> None:
    """Load a state_dict file into ``model`` (weights-only; .safetensors or torch)."""
    path = Path(weights)
    if not path.is_file():
        raise ModelSpecError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state, _ = _read_safetensors(path)
    else:
        state = _torch_load(path, weights_only=True, trust_pickle=False)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelSpecError(f"{path} does not hold a state_dict")
    _load_state(model, state, str(path))


def _load_state(model, state: dict, where: str) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensor shapes differ: the file is for another architecture/config
        raise ModelSpecError(
            f"weights in {where} do not fit the model ({_mismatch_line(e)}); check MODEL names the same architecture"
        ) from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ModelSpecError(
            f"weights in {where} do not match the model: {', '.join(parts)}; check MODEL names the same architecture"
        )


# ------------------------------------------------------------------------------------------ saving

def save_model(model, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``model`` atomically: a manifest (rebuildable, weights-only) when its source is a spec,
    else a full pickle (which needs ``trust_pickle`` to load back). ``.safetensors`` paths get a
    safetensors file with the manifest in its metadata (spec-sourced models only). An output that
    appears while this runs is not replaced unless ``force`` (:func:`normsurgeon.publish.publish`)."""
    out = check_output(path, force)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    manifest = provenance.manifest(model)
    if out.suffix == ".safetensors":
        if manifest is None:
            raise ModelSpecError(
                "this model was not built from a spec, so safetensors cannot describe it; save to .pt instead"
            )
        from safetensors.torch import save_file

        state = {k: v.clone() for k, v in state.items()}  # safetensors refuses shared storage
        publish(out, lambda tmp: save_file(state, tmp, metadata={META_KEY: json.dumps(manifest)}), force)
        return out
    import torch

    if manifest is not None:
        payload = {FORMAT_KEY: FORMAT_VERSION, "manifest": manifest, "state_dict": state}
        publish(out, lambda tmp: torch.save(payload, tmp), force)
    else:
        publish(out, lambda tmp: torch.save(model, tmp), force)
    return out
