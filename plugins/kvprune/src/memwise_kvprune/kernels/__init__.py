"""Compiled kernels of the KV cache, each beside the torch path it replaces and is tested against."""
