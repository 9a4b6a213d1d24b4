"""Compiled kernels of the FP8 optimizer step, each beside the torch reference it is tested against."""
