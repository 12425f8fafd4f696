"""Keep what a BatchNorm subclass did besides normalizing (timm's BatchNormAct2d: drop, then act)."""
from __future__ import annotations

from torch import nn


class NormAct(nn.Module):
    """``post(act(drop(norm(x))))``: a replacement norm plus the extras its BN-subclass predecessor applied.

    Third-party BN subclasses fuse an activation (and dropout) into the norm layer; replacing them by a
    bare norm silently drops the activation (pytorch#187298, timm#1254). The children keep the names
    ``norm``, ``drop``, ``act`` and ``post``.
    """

    def __init__(self, norm: nn.Module, drop: nn.Module | None = None, act: nn.Module | None = None,
                 post: nn.Module | None = None):
        super().__init__()
        self.norm = norm
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        self.post = post if post is not None else nn.Identity()  # e.g. proxy norm after the act

    def forward(self, x):
        return self.post(self.act(self.drop(self.norm(x))))


def bn_extras(bn: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The (drop, act) modules a BatchNorm subclass applies after normalizing, if any.

    Plain torch BN classes have none. Subclasses are recognised by child modules named ``drop`` and
    ``act`` (timm's convention); ``nn.Identity`` children count as absent.
    """
    def real(name: str) -> nn.Module | None:
        m = getattr(bn, name, None)
        return m if isinstance(m, nn.Module) and not isinstance(m, nn.Identity) else None

    return real("drop"), real("act")
