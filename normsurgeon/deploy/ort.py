"""ONNX Runtime sessions: choosing an execution provider and saying plainly what is missing.

Provider options: CUDA EP with ``cudnn_conv_algo_search=EXHAUSTIVE`` (warm-up
covers the search) and ``cudnn_conv_use_max_workspace=1``; TF32 stays ORT's default unless
``strict_fp32`` (then ``use_tf32=0``; the cuDNN-frontend path also needs NVIDIA_TF32_OVERRIDE=0).
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field

from normsurgeon.errors import DependencyError, ModelSpecError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise DependencyError("onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu") from None
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


def available() -> list[str]:
    return list(_ort().get_available_providers())


def _loadable(*names: str) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def missing_for(provider: str) -> list[str]:
    """What stands between this machine and ``provider`` (empty: nothing)."""
    ort_name = PROVIDERS[provider]
    if provider == "cpu" or ort_name in available():
        return []
    missing = []
    if not _installed("onnxruntime-gpu"):
        pkgs = [d for d in ("onnxruntime", "onnxruntime-openvino", "onnxruntime-directml") if _installed(d)]
        have = f" (installed: {', '.join(pkgs)}, which has no {ort_name})" if pkgs else ""
        missing.append(f"the onnxruntime-gpu package{have}: pip uninstall onnxruntime && pip install onnxruntime-gpu")
    if not _loadable("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        missing.append("an NVIDIA driver (libcuda.so.1 not found: no GPU or no driver)")
    libs = {"CUDA runtime": ("libcudart.so.13", "libcudart.so.12", "libcudart.so"),
            "cuBLAS": ("libcublas.so.13", "libcublas.so.12", "libcublas.so"),
            "cuDNN 9": ("libcudnn.so.9", "libcudnn.so")}
    if provider == "tensorrt":
        libs["TensorRT"] = ("libnvinfer.so.10", "libnvinfer.so")
    _preload_from_torch()
    absent = [k for k, names in libs.items() if not _loadable(*names)]
    if absent:
        missing.append("CUDA libraries " + ", ".join(absent) + " (pip install onnxruntime-gpu[cuda,cudnn])")
    if not missing:
        missing.append(f"{ort_name} is not in onnxruntime.get_available_providers() = {available()}")
    return missing


def _preload_from_torch() -> None:
    """torch's CUDA wheels bring cuDNN/cuBLAS; importing torch makes them loadable (ORT docs)."""
    try:
        importlib.import_module("torch")  # loads torch's bundled CUDA libraries as a side effect
    except ImportError:
        pass


@dataclass
class ProviderChoice:
    name: str  # cpu | cuda | tensorrt
    ort_providers: list = field(default_factory=list)  # what InferenceSession gets
    note: str = ""

    @property
    def device(self) -> str:
        return "cpu" if self.name == "cpu" else "cuda"


def choose(provider: str = "auto", *, strict_fp32: bool = False) -> ProviderChoice:
    """Resolve ``auto|cpu|cuda|tensorrt``. An explicit GPU provider that is unavailable raises one
    DependencyError naming everything missing; ``auto`` falls back to CPU and says why."""
    provider = (provider or "auto").lower()
    if provider not in ("auto", *PROVIDERS):
        raise DependencyError(f"unknown provider {provider!r}: use auto, cpu, cuda or tensorrt")
    if provider == "auto":
        for cand in ("tensorrt", "cuda"):
            if PROVIDERS[cand] in available():
                c = choose(cand, strict_fp32=strict_fp32)
                c.note = f"auto picked {cand}"
                return c
        c = choose("cpu")
        c.note = "auto picked cpu: " + "; ".join(missing_for("cuda"))
        return c
    missing = missing_for(provider)
    if missing:
        raise DependencyError(f"{provider} execution provider unavailable; missing: " + "; ".join(missing))
    cuda_opts = {"cudnn_conv_algo_search": "EXHAUSTIVE", "cudnn_conv_use_max_workspace": "1",
                 "do_copy_in_default_stream": "1"}
    if strict_fp32:
        cuda_opts["use_tf32"] = "0"
        os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
    if provider == "cpu":
        provs = ["CPUExecutionProvider"]
    elif provider == "cuda":
        provs = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
    else:
        provs = ["TensorrtExecutionProvider", ("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
    return ProviderChoice(provider, provs)


def session(path: str, choice: ProviderChoice | None = None, *, threads: int | None = None,
            spinning: bool = True):
    """An InferenceSession with all graph optimizations on. ``spinning=False`` stops idle intra-op
    threads from busy-waiting, so sessions timed in turn do not steal each other's cores."""
    if threads is not None and int(threads) < 1:
        raise ModelSpecError(f"threads={threads}: must be 1 or more (None for ONNX Runtime's default)")
    ort = _ort()
    choice = choice or choose("cpu")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 4  # failures come back as exceptions; ORT's own log would print them twice
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=choice.ort_providers)


def run(sess, x) -> list:
    """Run on a numpy array (or torch tensor) fed to the first input; returns all outputs."""
    import numpy as np

    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    inp = sess.get_inputs()[0]
    if "float16" in inp.type:
        arr = arr.astype(np.float16)
    elif "float" in inp.type:
        arr = arr.astype(np.float32)
    return sess.run(None, {inp.name: arr})
