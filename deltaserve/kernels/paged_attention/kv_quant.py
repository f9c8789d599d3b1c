"""Quantized paged KV cache (`kv_cache_dtype` "int8" | "int4" | "fp8"): layout, allocation, torch quantize/dequantize.

One side (K or V) of a layer is a `QuantizedKV`: the codes in the paged layout plus per-token-per-head fp32 scales
(and zeros for the integer kinds) beside the blocks, all indexed [block, offset, kv head]:
- int8: codes int8 [NB, BS, Hkv, D], x = (code + 128) * scale + zero, zero = row min, scale = (max - min) / 255.
- int4: codes uint8 [NB, BS, Hkv, D/2], element 2i in the low nibble of byte i, 2i+1 in the high nibble;
  x = code * scale + zero, zero = row min, scale = (max - min) / 15.
- fp8:  codes float8_e4m3fn [NB, BS, Hkv, D], x = code * scale, scale = absmax / 448 (symmetric: no zero).
A row is the D values of one token and one kv head. A constant row gets scale 0 (every code 0, x = zero exactly).

Scales and zeros are fp32, not fp16: they are read once per row (8 bytes beside 256 int8 codes at D=256, 3% of the
bytes), and an fp16 scale would go subnormal (and lose bits) for heads whose values span less than ~0.02.

Rounding is floor(y + 0.5) on y = (x - zero) * (1 / scale), the exact sequence the Triton store kernel runs, so the
two agree code for code up to the GPU's fp32 reciprocal."""
from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "int8", "int4", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_CODE_DTYPE = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}
_KIND_OF = {v: k for k, v in _CODE_DTYPE.items()}
_LEVELS = {"int8": 255.0, "int4": 15.0}


def check_kv_cache_dtype(kv_cache_dtype: str) -> str:
    """-> kv_cache_dtype ("fp8_e4m3", vLLM's name for our fp8, is "fp8"), or a ValueError naming the accepted
    values."""
    if kv_cache_dtype == "fp8_e4m3":
        return "fp8"
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(repr(k) for k in KV_CACHE_DTYPES)}, "
                         f"got {kv_cache_dtype!r}")
    return kv_cache_dtype


def check_kv_cache_device(kv_cache_dtype: str, device: torch.device) -> None:
    """ValueError (one sentence) for a kv_cache_dtype the device's kernels cannot run: Triton has e4m3 (fp8e4nv)
    only from compute capability 8.9 (Ada, Hopper) on."""
    if kv_cache_dtype == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"kv_cache_dtype='fp8' needs a GPU of compute capability 8.9 or later (Ada, Hopper), this "
                         f"one is {major}.{minor}; use kv_cache_dtype='int8'")


@dataclass
class QuantizedKV:
    """One side (K or V) of one layer's quantized paged cache; every tensor's first axis is the block."""
    codes: torch.Tensor  # int8 [NB, BS, Hkv, D] | uint8 [NB, BS, Hkv, D/2] (int4) | float8_e4m3fn [NB, BS, Hkv, D]
    scale: torch.Tensor  # fp32 [NB, BS, Hkv]
    zero: torch.Tensor | None  # fp32 [NB, BS, Hkv] (int8 / int4: the row minimum); None for fp8

    @property
    def kind(self) -> str:
        return _KIND_OF[self.codes.dtype]

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * (2 if self.kind == "int4" else 1)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(NB, BS, Hkv, D) of the values this cache holds (as a 16-bit cache's .shape)."""
        nb, bs, hkv, _ = self.codes.shape
        return nb, bs, hkv, self.head_dim

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of this cache (block-indexed on axis 0): what a block copy must copy. fp8 codes come as their
        bytes (a uint8 view): CPU index_copy_ has no float8 kernel."""
        codes = self.codes.view(torch.uint8) if self.codes.dtype == torch.float8_e4m3fn else self.codes
        return [codes, self.scale] + ([self.zero] if self.zero is not None else [])


def block_tensors(cache: torch.Tensor | QuantizedKV) -> list[torch.Tensor]:
    """The tensors of one cache side whose axis 0 is the block (a 16-bit cache is one tensor)."""
    return cache.tensors() if isinstance(cache, QuantizedKV) else [cache]


def allocate_kv(kv_cache_dtype: str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor | QuantizedKV:
    """One zeroed cache side: a [NB, BS, Hkv, D] tensor in `dtype` for "auto", else a QuantizedKV."""
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype == "auto":
        return torch.zeros((num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype, device=device)
    if kv_cache_dtype == "int4" and head_dim % 2:
        raise ValueError(f"kv_cache_dtype='int4' packs two values a byte and needs an even head_dim, got {head_dim}")
    width = head_dim // 2 if kv_cache_dtype == "int4" else head_dim
    codes = torch.zeros((num_blocks, block_size, num_kv_heads, width), dtype=_CODE_DTYPE[kv_cache_dtype],
                        device=device)
    scale = torch.zeros((num_blocks, block_size, num_kv_heads), dtype=torch.float32, device=device)
    zero = torch.zeros_like(scale) if kv_cache_dtype != "fp8" else None
    return QuantizedKV(codes, scale, zero)


# The largest dequantized copy of the contexts a quantized cache's prefill may make (triton_quant.dequantized_context):
# at Hkv 4, head_dim 256 in bf16 that is 64k keys; longer contexts run the quantized step. The memory profile
# (worker/model_runner.profile_activation_bytes) reserves it.
PREFILL_DEQUANT_BYTES = 256 << 20


def kv_bytes_per_token_head(kv_cache_dtype: str, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token of one kv head takes in ONE side (K or V) of the cache, scales and zeros included."""
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype == "auto":
        return head_dim * torch.empty((), dtype=dtype).element_size()
    codes = head_dim // 2 if kv_cache_dtype == "int4" else head_dim
    return codes + (4 if kv_cache_dtype == "fp8" else 8)


def quantize_kv(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x: [..., D] float -> (codes [..., D or D/2] in the kind's code dtype, scale [...] fp32, zero [...] fp32 or
    None), one scale (and zero) per row of D values."""
    x = x.float()
    if kind == "fp8":
        scale = x.abs().amax(-1) / FP8_MAX
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        codes = (x * inv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return codes, scale, None
    levels = _LEVELS[kind]
    lo, hi = x.amin(-1), x.amax(-1)
    scale = (hi - lo) / levels
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.floor((x - lo[..., None]) * inv[..., None] + 0.5).clamp(0, levels)
    if kind == "int8":
        return (q - 128).to(torch.int8), scale, lo
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale, lo


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Inverse of quantize_kv (up to rounding) -> [..., D] fp32."""
    if kind == "fp8":
        return codes.float() * scale[..., None]
    if kind == "int8":
        q = codes.float() + 128
    else:
        q = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2).float()
    return q * scale[..., None] + zero[..., None]


def read_blocks(cache: torch.Tensor | QuantizedKV, blocks: torch.Tensor) -> torch.Tensor:
    """The values of `blocks` [n] -> [n, BS, Hkv, D]: a 16-bit cache as stored, a quantized one dequantized (fp32)."""
    if not isinstance(cache, QuantizedKV):
        return cache[blocks]
    zero = cache.zero[blocks] if cache.zero is not None else None
    return dequantize_kv(cache.codes[blocks], cache.scale[blocks], zero, cache.kind)


def write_rows(cache: torch.Tensor | QuantizedKV, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Store x [n, Hkv, D] at flat slots [n] (block * BS + offset, all >= 0): cast, or quantized per row."""
    if not isinstance(cache, QuantizedKV):
        nb, bs = cache.shape[:2]
        cache.view(nb * bs, *cache.shape[2:]).index_copy_(0, slots, x.to(cache.dtype))
        return
    codes, scale, zero = quantize_kv(x, cache.kind)
    nb, bs = cache.codes.shape[:2]
    flat = cache.codes.view(nb * bs, *cache.codes.shape[2:])
    if codes.dtype == torch.float8_e4m3fn:  # index_copy_ has no float8 kernel on CPU: copy the bytes
        flat, codes = flat.view(torch.uint8), codes.view(torch.uint8)
    flat.index_copy_(0, slots, codes)
    cache.scale.view(nb * bs, -1).index_copy_(0, slots, scale)
    if zero is not None:
        cache.zero.view(nb * bs, -1).index_copy_(0, slots, zero)
