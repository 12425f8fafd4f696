"""How close the student is to the teacher on a fixed set of samples: distillation loss, top-1
agreement, mean output difference, and accuracy where the data has labels.

Every rank measures the same samples (the first ``EVAL_SAMPLES`` of the data, in order), so every
rank reports the same figures without communication.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normsurgeon.distillation import outputs

EVAL_SAMPLES = 2048
EVAL_BATCH = 256


def eval_indices(n: int, limit: int = EVAL_SAMPLES) -> torch.Tensor:
    return torch.arange(min(n, limit))


def measure(student: nn.Module, teacher: nn.Module, dataset: Any, index: torch.Tensor, device, dtype,
            kind: str = "auto", temperature: float = 1.0) -> dict[str, float | None]:
    """``{"loss", "agreement", "output_diff", "accuracy", "teacher_accuracy"}`` over ``index``."""
    modes = [(m, m.training) for m in student.modules()]
    student.eval()
    n = agree = correct = t_correct = 0
    loss_sum = diff_sum = 0.0
    labelled = dataset.has_labels
    try:
        with torch.no_grad():
            for start in range(0, len(index), EVAL_BATCH):
                x, y = dataset.take(index[start:start + EVAL_BATCH])
                x = x.to(device=device, dtype=dtype)
                s_out, t_out = student(x), teacher(x)
                b = int(x.shape[0])
                loss_sum += float(outputs.loss(s_out, t_out, kind, temperature)) * b
                s_top, t_top = outputs.top1(s_out), outputs.top1(t_out)
                agree += float((s_top == t_top).float().reshape(b, -1).mean(1).sum())
                diff_sum += float(outputs.mean_abs_diff(s_out, t_out).sum())
                if labelled and s_top.dim() == 1:
                    y = y.to(s_top.device)
                    correct += int((s_top == y).sum())
                    t_correct += int((t_top == y).sum())
                n += b
    finally:
        for m, training in modes:
            m.training = training
    has_acc = labelled and n > 0 and _is_classifier(student, dataset, device, dtype)
    return {
        "loss": loss_sum / n, "agreement": agree / n, "output_diff": diff_sum / n,
        "accuracy": correct / n if has_acc else None, "teacher_accuracy": t_correct / n if has_acc else None,
    }


def _is_classifier(student: nn.Module, dataset: Any, device, dtype) -> bool:
    x, _ = dataset.take(torch.arange(1))
    with torch.no_grad():
        return outputs.tensors(student(x.to(device=device, dtype=dtype)))[0].dim() == 2
