"""The seeded rule that picks the timm part of the corpus (not hand-picked).

Families are the leading letters of timm's model names (``efficientnet_b0`` -> ``efficientnet``,
``mobilenetv3_small_050`` -> ``mobilenetv``). The sorted families are shuffled with
``random.Random(0)``; in that order, each family contributes the model with the fewest parameters
among its first 12 names (sorted) that holds BatchNorm and builds on the meta device; families
without one are passed over, until 16 families are chosen. ``python -m tests.corpus_select``
prints the list; tests/corpus_timm.json is its committed output, checked against the rule by a slow
test."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

N_FAMILIES = 16
PER_FAMILY = 12
MAX_PARAMS = 30_000_000  # keep the sample runnable on a 2-core CPU
LIST = Path(__file__).with_name("corpus_timm.json")


def family(name: str) -> str:
    return re.match(r"[a-z]+", name).group(0)


def _meta_info(name: str):
    """(parameters, has BatchNorm, default input size) or None when the model cannot build on meta."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001 - the rule passes over models that need real tensors to build
        return None
    n = sum(p.numel() for p in m.parameters())
    has_bn = any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())
    size = list((getattr(m, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))
    return n, has_bn, size


def select() -> list[dict]:
    import timm

    names = sorted(timm.list_models())
    fams = sorted({family(n) for n in names})
    random.Random(0).shuffle(fams)
    chosen = []
    for fam in fams:
        best = None
        for name in [n for n in names if family(n) == fam][:PER_FAMILY]:
            info = _meta_info(name)
            if info is None or not info[1] or info[0] > MAX_PARAMS:
                continue
            if best is None or info[0] < best["params"]:
                best = {"family": fam, "model": name, "params": info[0], "input_size": info[2]}
        if best is not None:
            chosen.append(best)
        if len(chosen) == N_FAMILIES:
            break
    return chosen


if __name__ == "__main__":
    print(json.dumps(select(), indent=1))
