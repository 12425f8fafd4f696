"""Will a forward pass on this input fit in memory? Estimated without running it for real.

The model runs once on PyTorch's ``meta`` device (shapes only, no data, no allocation); the sizes of
every leaf module's outputs add up to the activations an eval forward keeps alive at most. When that
estimate exceeds the memory the machine has available, the input is refused up front with the
estimate, instead of a forward that ends in an out-of-memory kill.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from normsurgeon.errors import EnvironmentProblem

SAFETY = 1.5  # allocator overhead and temporaries the leaf outputs do not show


def activation_bytes(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int | None:
    """Bytes of all leaf-module outputs of one forward on an input of ``shape``, or None when the
    model cannot run on the meta device (data-dependent code): then nothing is estimated."""
    try:
        meta = copy.deepcopy(model).to("meta")
    except Exception:  # noqa: BLE001 - a module that cannot move: no estimate
        return None
    total = [0]

    def count(_m, _i, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    hooks = [m.register_forward_hook(count) for m in meta.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            meta.eval()(torch.empty(shape, device="meta", dtype=dtype))
    except Exception:  # noqa: BLE001 - data-dependent control flow, custom kernels: no estimate
        return None
    finally:
        for h in hooks:
            h.remove()
    return total[0] + int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def available_bytes() -> int | None:
    """Memory available to new allocations (Linux MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
               available: int | None = None) -> int | None:
    """Raise EnvironmentProblem (exit 4) when a forward on ``shape`` would not fit; returns the estimate."""
    need = activation_bytes(model, shape, dtype)
    have = available if available is not None else available_bytes()
    if need is not None and have is not None and need * SAFETY > have:
        raise EnvironmentProblem(
            f"an input of shape {','.join(map(str, shape))} needs about {need * SAFETY / 2**30:.1f} GiB of "
            f"activations and {have / 2**30:.1f} GiB is available: use a smaller --input-shape (or batch)")
    return need
