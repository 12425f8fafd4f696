"""Simulated analog weight noise (processing-in-memory / analog in-memory computing).

Model (``--noise weight:ETA``): every conv and linear module's ``weight`` (``nn.Conv*``,
``nn.ConvTranspose*``, ``nn.Linear`` and their subclasses) gets additive Gaussian noise

    W~ = W + eps,  eps ~ N(0, (ETA * max|W|)^2)  elementwise, max over that layer's weight tensor,

the additive weight-noise model relative to each layer's largest weight used by "Noisy Machines"
(Zhou et al. 2020) and aihwkit's ADD_NORMAL modifier with ``rel_to_actual_wmax``; noise-aware BN
recalibration under it follows Tsai et al., arXiv 2007.03230. Biases and normalization layers stay
digital (noise-free), as in analog stacks that keep them off the crossbar (aihwkit
``digital_bias``). Noise is defined on the *unfolded* weights: folding BN into a conv first would
change max|W| and so the noise. A weight shared by several modules is perturbed once. For weight-
standardized convs the noise lands on the stored (raw) weight, before standardization.

Instances are reproducible: the noise of instance ``seed`` comes from a torch CPU generator seeded
through numpy's ``SeedSequence`` with the stream ``(seed, 0)``; resampled draws use
``(seed, 1, batch, draw)``, so they never coincide with a fixed instance and are the same on every
rank and device. The same seed on the same clean weights gives the same noise in ``recalibrate``'s
fixed mode and in ``evaluate``. Draws use the weight's dtype (float32 and float64 draws differ).

:class:`WeightNoise` changes weights in place and restores the clean tensors bit for bit
(``copy_`` from saved clones) when it exits, also on error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from normsurgeon.errors import NoiseSpecError

NOISE_MODES = ("fixed", "resample")


@dataclass(frozen=True)
class NoiseSpec:
    kind: str
    eta: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.eta:g}"


def parse_noise(spec: "str | NoiseSpec | None") -> NoiseSpec | None:
    """``"weight:0.1"`` -> NoiseSpec; None or "" -> None (no noise)."""
    if spec is None or isinstance(spec, NoiseSpec):
        return spec
    text = str(spec).strip()
    if not text:
        return None
    kind, sep, value = text.partition(":")
    if kind != "weight" or not sep:
        raise NoiseSpecError(f"bad --noise {text!r}: write weight:ETA, e.g. weight:0.1 "
                             "(Gaussian weight noise, std ETA * max|W| per layer)")
    try:
        eta = float(value)
    except ValueError:
        raise NoiseSpecError(f"bad --noise {text!r}: ETA must be a number, e.g. weight:0.1") from None
    if not math.isfinite(eta) or eta < 0:
        raise NoiseSpecError(f"bad --noise {text!r}: ETA must be a finite number >= 0")
    return NoiseSpec(kind, eta)


def check_seed(seed: int | None, spec=None) -> int:
    """The noise seed to use: ``None`` means 0; a seed given without noise is a mistake (it would be
    silently ignored)."""
    if seed is None:
        return 0
    if spec is None:
        raise NoiseSpecError("--noise-seed needs --noise weight:ETA: without noise there is no instance to pick")
    return valid_seed(seed)


def valid_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise NoiseSpecError(f"bad --noise-seed {seed!r}: use an integer >= 0")
    return seed


def noise_targets(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(module_name, weight)`` of every conv/linear in ``model``, each weight tensor once."""
    out, seen = [], set()
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.is_floating_point() and id(w) not in seen:
                seen.add(id(w))
                out.append((name, w))
    return out


def stream_seed(*stream: int) -> int:
    """A 64-bit generator seed from a tuple of non-negative ints (numpy SeedSequence mixing)."""
    import numpy as np

    return int(np.random.SeedSequence(list(stream)).generate_state(1, dtype=np.uint64)[0])


def fixed_stream(seed: int) -> tuple[int, ...]:
    return (valid_seed(seed), 0)


def resample_stream(seed: int, batch: int, draw: int) -> tuple[int, ...]:
    return (valid_seed(seed), 1, int(batch), int(draw))


class WeightNoise:
    """Puts noise instances on a model's conv/linear weights; restores the clean ones on exit."""

    def __init__(self, model: nn.Module, spec: NoiseSpec) -> None:
        self.spec = spec
        self.targets = noise_targets(model)
        self.clean = [w.detach().clone() for _, w in self.targets]
        self.std = [spec.eta * float(c.abs().max()) if c.numel() else 0.0 for c in self.clean]

    def draw(self, *stream: int) -> list[torch.Tensor]:
        """The noise tensors of one instance, in target order (on CPU, in each weight's dtype)."""
        g = torch.Generator().manual_seed(stream_seed(*stream))
        return [torch.randn(c.shape, generator=g, dtype=c.dtype) * s for c, s in zip(self.clean, self.std)]

    @torch.no_grad()
    def apply(self, *stream: int) -> None:
        for (_, w), c, eps in zip(self.targets, self.clean, self.draw(*stream)):
            w.copy_(c + eps.to(c.device))

    @torch.no_grad()
    def restore(self) -> None:
        for (_, w), c in zip(self.targets, self.clean):
            w.copy_(c)

    def __enter__(self) -> "WeightNoise":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def noise_instance(model: nn.Module, spec: "str | NoiseSpec", seed: int) -> dict[str, torch.Tensor]:
    """The fixed noise instance ``seed`` for ``model`` as ``{module_name: eps}`` (for inspection)."""
    spec = parse_noise(spec)
    if spec is None:
        return {}
    wn = WeightNoise(model, spec)
    return {name: eps for (name, _), eps in zip(wn.targets, wn.draw(*fixed_stream(seed)))}


def resolve_noise(noise, noise_mode: str = "fixed", noise_seed: int | None = None,
                  noise_samples: int = 1) -> tuple[NoiseSpec | None, int, int]:
    """Check the --noise* options together (the rules ``recalibrate`` applies): ``(spec, seed, draws)``
    with ``draws`` the forward passes per batch (K in resample mode, else 1)."""
    spec = parse_noise(noise)
    if noise_mode not in NOISE_MODES:
        raise NoiseSpecError(f"bad --noise-mode {noise_mode!r}: use fixed or resample")
    seed = check_seed(noise_seed, spec)
    if isinstance(noise_samples, bool) or not isinstance(noise_samples, int) or noise_samples < 1:
        raise NoiseSpecError(f"bad --noise-samples {noise_samples!r}: use an integer >= 1")
    if spec is None and (noise_mode != "fixed" or noise_samples != 1):
        raise NoiseSpecError("--noise-mode/--noise-samples need --noise weight:ETA")
    if noise_mode == "fixed" and noise_samples != 1:
        raise NoiseSpecError("--noise-samples applies to --noise-mode resample: one fixed instance gives the "
                             "same statistics at every draw")
    return spec, seed, (noise_samples if spec is not None and noise_mode == "resample" else 1)
