"""Triton kernels (imported lazily: triton is optional at import time)."""
