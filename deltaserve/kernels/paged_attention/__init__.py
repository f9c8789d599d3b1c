"""Paged attention dispatch: `paged_attention_varlen` / `store_kv` are the torch reference (CPU path, CI); the
Triton kernels are exported for CUDA dispatch (the model wires them). Triton is optional: without it only the
reference is importable."""
from .reference import paged_attention_varlen, store_kv

__all__ = ["paged_attention_varlen", "store_kv"]

try:
    from .triton import (paged_attention_decode, paged_attention_prefill, paged_attention_varlen_triton,
                         store_kv_triton)
except ImportError:  # no triton installed: the reference path still works
    pass
else:
    __all__ += ["paged_attention_decode", "paged_attention_prefill", "paged_attention_varlen_triton",
                "store_kv_triton"]
