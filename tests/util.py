"""Helpers shared by test files (import as ``from tests.util import ...``)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running stats and affine, so exactness tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model


def run_cli(*args: str, cwd: str | Path | None = None, env: dict | None = None, timeout: int = 600,
            real: bool = False):
    """``normsurgeon ARGS``; returns an object with ``returncode``, ``stdout`` and ``stderr``.

    In this process by default (the CLI's own entry point, ``normsurgeon.cli.app.run``, with stdout and
    stderr captured, the working directory, environment, ``sys.path`` and modules imported from
    temporary folders restored afterwards). ``real=True`` (or a ``PYTHONPATH`` in ``env``) runs
    ``python -m normsurgeon`` in a subprocess instead: for what only a fresh interpreter shows (what is
    imported, what reaches stderr from warnings and loggers, signals, the module entry point)."""
    if real or (env and "PYTHONPATH" in env):
        return _run_subprocess(args, cwd, env, timeout)
    return _run_here(args, cwd, env)


def _run_subprocess(args, cwd, env, timeout):
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("COLUMNS", "200")
    e.setdefault("OMP_NUM_THREADS", "1")  # like tests/conftest.py: one thread per process under `pytest -n 2`
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "normsurgeon", *args], cwd=cwd, env=e,
        capture_output=True, text=True, timeout=timeout,
    )


def _run_here(args, cwd, env):
    from normsurgeon.cli.app import run

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_env, old_path = os.getcwd(), dict(os.environ), list(sys.path)
    old_modules, threads = set(sys.modules), torch.get_num_threads()
    run_dir = os.path.abspath(cwd) if cwd is not None else None
    os.environ.setdefault("COLUMNS", "200")
    os.environ.update(env or {})
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run([str(a) for a in args])
    finally:
        # factories the run imported from the folders it put on sys.path (a test's folder): not cached
        # for the next test, which may hold another module of the same name. Never the project's own
        # modules or installed packages (the checkout and its virtualenv may themselves be in /tmp).
        added = {os.path.abspath(p) for p in set(sys.path) - set(old_path)}
        added |= {run_dir} if run_dir is not None else set()
        protected = tuple(os.path.abspath(p) + os.sep for p in (ROOT, sys.prefix, sys.base_prefix))
        for name in set(sys.modules) - old_modules:
            f = os.path.abspath(getattr(sys.modules[name], "__file__", None) or os.sep)
            if not f.startswith(protected) and any(f.startswith(d + os.sep) for d in added):
                del sys.modules[name]
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        sys.path[:] = old_path
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def assert_one_error_line(proc, *needles) -> None:
    """A user mistake through the CLI: exit 2, one ``error:`` line on stderr naming ``needles``, no
    traceback, not reported as an internal error."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "internal error" not in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
