"""Ghost Batch Normalization (Hoffer et al. 2017), in the form of "Four Things Everyone Should Know
to Improve Batch Normalization" (Summers & Dinneen 2020; ceciliaresearch/four_things_batch_norm):
training statistics over virtual sub-batches of ``virtual_batch`` samples, even inside large
batches (a regularizer at small and medium batch sizes; the reference docstring's example is 16),
moving averages over the whole batch (decay 0.99). Eval is BN's constant per-channel affine.
"""
from __future__ import annotations

from normsurgeon.layers.example_bn import FOUR_THINGS_DECAY, FOUR_THINGS_EPS, GeneralizedBatchNorm

GHOST_BATCH = 16  # reference docstring's Ghost BN example value


class GhostBatchNorm(GeneralizedBatchNorm):
    def __init__(self, num_features: int, virtual_batch: int = GHOST_BATCH, eps: float = FOUR_THINGS_EPS,
                 decay: float = FOUR_THINGS_DECAY) -> None:
        super().__init__(num_features, examples_per_group=virtual_batch, channels_per_group=1, alpha=0.0,
                         eps=eps, decay=decay)
