"""Attack files for the security tests: files normsurgeon wrote, then edited as an attacker would."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from normsurgeon.model_io import FORMAT_KEY, META_KEY
from tests.util import run_cli

MODEL = "normsurgeon:digits_cnn"  # a bundled zoo model: cheap, and its files need no --trust-code


def write_model(folder: Path, name: str) -> Path:
    """A genuine normsurgeon file (converted digits CNN) in ``folder``."""
    code, _, err = cli(["convert", MODEL, "--to", "gn", "-o", str(folder / name), "--input-shape", "2,1,16,16"])
    assert code == 0, err
    return folder / name


def manifest_of(path: Path) -> dict:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()[META_KEY])
    return torch.load(path, weights_only=True)["manifest"]


def edit(path: Path, change: Callable[[dict], object], out: Path | None = None) -> Path:
    """Rewrite ``path``'s manifest with ``change(manifest)`` (which edits it in place, or returns a
    replacement, possibly not a dict, or a str written as raw metadata) into ``out``."""
    out = out or path
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        manifest = json.loads(meta[META_KEY])
        new = change(manifest)
        new = manifest if new is None else new
        meta[META_KEY] = new if isinstance(new, str) else json.dumps(new)
        save_file(tensors, str(out), metadata=meta)
    else:
        payload = torch.load(path, weights_only=True)
        new = change(payload["manifest"])
        payload["manifest"] = payload["manifest"] if new is None else new
        torch.save(payload, out)
    return out


def edit_payload(path: Path, change: Callable[[dict], None], out: Path) -> Path:
    """Rewrite a ``.pt`` file's whole payload (format key, manifest, state_dict)."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, out)
    return out


def cli(argv: list[str], cwd: Path | None = None) -> tuple[int, str, str]:
    """The real command line, in this process: (exit code, stdout, stderr)."""
    r = run_cli(*argv, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


def one_error_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in lines[0] and "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


__all__ = ["FORMAT_KEY", "MODEL", "cli", "edit", "edit_payload", "manifest_of", "one_error_line", "run_cli",
           "write_model"]
