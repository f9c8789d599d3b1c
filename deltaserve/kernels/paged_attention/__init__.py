"""Paged attention dispatch: `paged_attention_varlen` / `store_kv` are the torch reference (CPU path, CI oracle).

The Triton entry points (`paged_attention_prefill`, `paged_attention_decode`, `paged_attention_mixed`,
`paged_attention_varlen_triton`, `store_kv_triton`, see triton.py and triton_decode.py) are exported lazily: importing
deltaserve must not import triton, because @triton.jit (and triton's own standard library) choose interpreter or
compiler once, at import, from TRITON_INTERPRET — a CPU test that sets it after an eager import would get uncallable
GPU kernels.

A cache side is a [NB, BS, Hkv, D] tensor in the model dtype or a QuantizedKV (kv_quant.py); every entry point takes
either."""
from .kv_quant import KV_CACHE_DTYPES, QuantizedKV, allocate_kv, block_tensors, check_kv_cache_dtype
from .reference import paged_attention_varlen, store_kv

__all__ = ["paged_attention_varlen", "store_kv", "write_kv", "attend", "KV_CACHE_DTYPES", "QuantizedKV",
           "allocate_kv", "block_tensors", "check_kv_cache_dtype", "paged_attention_prefill",
           "paged_attention_decode", "paged_attention_mixed", "paged_attention_varlen_triton", "store_kv_triton"]
_TRITON_EXPORTS = frozenset(__all__[9:])


def __getattr__(name: str):
    """PEP 562 lazy export of the Triton entry points (first access imports triton.py)."""
    if name == "paged_attention_decode":
        from .triton_decode import paged_attention_decode
        return paged_attention_decode
    if name == "paged_attention_mixed":
        from .triton_decode import paged_attention_mixed
        return paged_attention_mixed
    if name in _TRITON_EXPORTS:
        from . import triton as triton_kernels
        return vars(triton_kernels)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Store this step's keys and values at their flat cache slots (-1: skip), quantizing for a QuantizedKV cache:
    Triton on CUDA (no host sync, so graph-capturable), the reference elsewhere. k, v: [T, Hkv, D];
    caches: [NB, BS, Hkv, D]; slot_mapping: [T]."""
    if k.is_cuda:
        from .triton import store_kv_triton

        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv(k, v, k_cache, v_cache, slot_mapping)


def attend(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale: float, gate, query_lens: list[int],
           context_lens_cpu: list[int], max_context_len: int, is_decode: bool, decode_rows: int = 0):
    """Causal attention of this step's queries over the paged KV, output multiplied by sigmoid(gate).

    q, gate: [T, H, D]; caches: [NB, BS, Hkv, D]; block_tables: [N, max_blocks]; cu_seqlens [N+1] and
    context_lens [N] on the device, with host copies query_lens / context_lens_cpu; max_context_len: a bound on
    every context (under CUDA graphs, the capture bound); decode_rows: leading one-token sequences of a mixed step.
    On CUDA: split-K decode for one-token sequences (all of a decode step, the leading decode_rows of a mixed one),
    the varlen prefill kernel for the others; elsewhere the torch reference. -> [T, H, D] in q's dtype."""
    if not q.is_cuda:
        return paged_attention_varlen(q, k_cache, v_cache, block_tables, query_lens, context_lens_cpu, scale, gate)
    if is_decode:
        from .triton_decode import paged_attention_decode

        return paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, gate, max_context_len)
    if decode_rows:
        from .triton_decode import paged_attention_mixed

        return paged_attention_mixed(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale, gate,
                                     query_lens, context_lens_cpu, decode_rows)
    from .triton import paged_attention_prefill

    return paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale, gate,
                                   query_lens, context_lens_cpu)
