"""Normalization layers, one concept a file. Parameter names follow torch (weight, bias, running_*)."""
from normsurgeon.layers.affine import ChannelAffine
from normsurgeon.layers.frozen_bn import FrozenBatchNorm
from normsurgeon.layers.norm_act import NormAct
from normsurgeon.layers.ws_conv import WSConv1d, WSConv2d, WSConv3d, standardize_weight

__all__ = ["ChannelAffine", "FrozenBatchNorm", "NormAct", "WSConv1d", "WSConv2d", "WSConv3d", "standardize_weight"]
