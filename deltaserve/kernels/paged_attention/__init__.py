"""Paged attention dispatch: the torch reference for now; Triton kernels will be picked on CUDA."""
from .reference import paged_attention_varlen, store_kv

__all__ = ["paged_attention_varlen", "store_kv"]
