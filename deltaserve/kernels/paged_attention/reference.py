"""Torch reference for paged KV store and varlen causal attention over paged KV (GQA, any head_dim).

KV cache layout (whole engine): k_cache, v_cache: [num_blocks, block_size, Hkv, D], either a tensor in the model dtype
or a QuantizedKV (kv_quant.py: int8 / int4 / fp8 codes of the same layout plus per-token-per-head scales and zeros).
Token j of a sequence lives in block block_table[j // block_size] at offset j % block_size.
"""
import torch

from .kv_quant import QuantizedKV, read_blocks, write_rows

Cache = torch.Tensor | QuantizedKV


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: Cache, v_cache: Cache, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D]; caches: [NB, BS, Hkv, D] (quantized caches: quantized on write); slot_mapping: [T] int64
    (-1: do not store) -> in place."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    write_rows(k_cache, slot_mapping, k)
    write_rows(v_cache, slot_mapping, v)


def paged_attention_varlen(q: torch.Tensor, k_cache: Cache, v_cache: Cache,
                           block_tables: torch.Tensor, query_lens: list[int], context_lens: list[int],
                           scale: float, gate: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D]; caches: [NB, BS, Hkv, D] (quantized caches: dequantized on read); block_tables: [N, max_blocks];
    query_lens, context_lens: N host ints (the last query_lens[i] of context_lens[i] cached tokens are this step's
    queries); gate: [T, H, D] or None -> [T, H, D] in q's dtype.

    Causal: query at position p sees cached tokens 0..p. Softmax in fp32. With `gate`, the result is
    attn * sigmoid(gate), the product taken in fp32 on the attention output as rounded to q's dtype."""
    _, bs, hkv, _ = k_cache.shape
    group = q.shape[1] // hkv
    out = torch.empty_like(q)
    start = 0
    for i, (ql, cl) in enumerate(zip(query_lens, context_lens)):
        if ql == 0:
            continue
        blocks = block_tables[i, : (cl + bs - 1) // bs].long()
        k = read_blocks(k_cache, blocks).flatten(0, 1)[:cl].repeat_interleave(group, dim=1)  # [cl, H, D]
        v = read_blocks(v_cache, blocks).flatten(0, 1)[:cl].repeat_interleave(group, dim=1)
        qi = q[start : start + ql]
        scores = torch.einsum("qhd,khd->hqk", qi, k.to(q.dtype)).float() * scale
        q_pos = torch.arange(cl - ql, cl, device=q.device)[:, None]
        mask = torch.arange(cl, device=q.device)[None, :] > q_pos  # [ql, cl] future keys
        scores.masked_fill_(mask[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out[start : start + ql] = torch.einsum("hqk,khd->qhd", probs, v.to(q.dtype))
        start += ql
    if gate is not None:
        out = (out.float() * torch.sigmoid(gate.float())).to(q.dtype)
    return out
