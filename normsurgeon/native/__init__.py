"""Optional C kernels, compiled on first use (see :mod:`normsurgeon.native.build`); every caller has a
pure-PyTorch fallback, so a machine without a C compiler loses speed, never function."""
