"""Shared quantization helpers: torch references (CPU path, test oracles) and triton kernels.

Triton is imported only inside the functions that launch kernels, never at plugin discovery.
"""
