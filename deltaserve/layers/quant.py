"""int4 weight-only formats: tensor layouts, pack/unpack, dequantize (the torch reference) and RTN quantize.

AWQ (AutoAWQ "gemm"): qweight int32 [in, out/8], qzeros int32 [in/G, out/8], scales [in/G, out]; inside an int32,
logical column 8c + AWQ_ORDER[i] sits at bits 4i; W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n], y = x W.
compressed-tensors pack-quantized: weight_packed int32 [out, in/8] (element 8j + i at bits 4i, stored +8),
weight_scale [out, in/G], optional weight_zero_point int32 [out/8, in/G] (packed along out, stored +8);
W[n, k] = (q - zp) * scale with q and zp signed. Leading dims (experts) pass through every function.
Tensor parallelism cuts a Linear's [out, in] weight along out (column-parallel) or in (row-parallel);
`TensorSpec.cut` says which dim of each int4 tensor that is and how many channels one element along it covers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an int32 holds logical column 8c + AWQ_ORDER[i]


@dataclass(frozen=True)
class TensorSpec:
    shape: Callable[[int, int, int], tuple[int, int]]  # (in_features, out_features, group) -> shape
    packed: bool  # int32 holding 8 nibbles (else a scale, held in fp32: exact for fp16 and bf16)
    out_dim: int  # the dim indexing output channels: fused pieces and experts stack along it
    per_out: int  # output channels per element along out_dim (8 where packed along out)
    in_dim: int  # the dim indexing input channels (or their groups): row-parallel shards cut along it
    per_in: int | None  # input channels per element along in_dim (8 where packed along in); None: one group

    def cut(self, dim: int, ranges: list[tuple[int, int]], group: int) -> tuple[int, list[tuple[int, int]]]:
        """A cut of the [out, in] weight (dim 0: output rows, 1: input columns; `ranges` in channels) -> the same
        cut of this tensor (its dim, ranges in its elements). Every boundary must be a multiple of the channels
        one element covers (unit_along); ValueError otherwise (check_tp_size reports it up front)."""
        tdim, unit = self.unit_along(dim, group)
        if any(a % unit or b % unit for a, b in ranges):
            raise ValueError(f"ranges {ranges} do not fall on this tensor's {unit}-channel elements")
        return tdim, [(a // unit, b // unit) for a, b in ranges]

    def unit_along(self, dim: int, group: int) -> tuple[int, int]:
        """-> (this tensor's dim for the weight's dim `dim`, channels per element along it)."""
        if dim == 0:
            return self.out_dim, self.per_out
        return self.in_dim, self.per_in or group


# format -> the tensors one quantized Linear holds, by checkpoint suffix
FORMATS: dict[str, dict[str, TensorSpec]] = {
    "awq": {
        "qweight": TensorSpec(lambda i, o, g: (i, o // 8), True, 1, 8, 0, 1),
        "qzeros": TensorSpec(lambda i, o, g: (i // g, o // 8), True, 1, 8, 0, None),
        "scales": TensorSpec(lambda i, o, g: (i // g, o), False, 1, 1, 0, None),
    },
    "ct": {
        "weight_packed": TensorSpec(lambda i, o, g: (o, i // 8), True, 0, 1, 1, 8),
        "weight_scale": TensorSpec(lambda i, o, g: (o, i // g), False, 0, 1, 1, None),
    },
    "ct_zp": {
        "weight_packed": TensorSpec(lambda i, o, g: (o, i // 8), True, 0, 1, 1, 8),
        "weight_scale": TensorSpec(lambda i, o, g: (o, i // g), False, 0, 1, 1, None),
        "weight_zero_point": TensorSpec(lambda i, o, g: (o // 8, i // g), True, 0, 8, 1, None),
    },
}
QUANT_SUFFIXES = {s: ("awq" if fmt == "awq" else "ct") for fmt, specs in FORMATS.items() for s in specs}
SPECS = {suffix: spec for specs in FORMATS.values() for suffix, spec in specs.items()}  # ct and ct_zp agree


def check_shapes(fmt: str, in_features: int, out_features: int, group: int, name: str) -> str | None:
    """The reason `name` cannot hold this format at these sizes, or None."""
    if in_features % group:
        return f"group_size {group} does not divide its in_features {in_features}"
    if fmt == "awq" and out_features % 8:
        return f"AWQ packs 8 output channels per int32 but it has {out_features} outputs"
    if fmt.startswith("ct") and (in_features % 8 or (fmt == "ct_zp" and out_features % 8)):
        return f"compressed-tensors packs 8 channels per int32 but it is {in_features} x {out_features}"
    return None


def pack_int4(q: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """q: [..., 8m] integers 0..15 -> [..., m] int32 with element 8c + order[i] at bits 4i."""
    q = q.to(torch.int32).reshape(*q.shape[:-1], q.shape[-1] // 8, 8)[..., list(order)]  # -1: 0 rows fail
    out = torch.zeros(q.shape[:-1], dtype=torch.int32, device=q.device)
    for i in range(8):
        out |= q[..., i] << (4 * i)
    return out


def unpack_int4(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """packed: [..., m] int32 -> [..., 8m] int32 values 0..15 (inverse of pack_int4 with the same order).

    Only device-side ops (no index lists copied from the host), so it can run inside a CUDA graph."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[..., None] >> shifts) & 0xF  # [..., m, 8] in nibble order
    if order == AWQ_ORDER:  # nibbles hold columns [0,2,4,6,1,3,5,7]: interleave the two halves
        nibbles = nibbles.view(*nibbles.shape[:-1], 2, 4).transpose(-1, -2)
    elif order != tuple(range(8)):
        nibbles = nibbles[..., [order.index(j) for j in range(8)]]
    return nibbles.reshape(*packed.shape[:-1], 8 * packed.shape[-1])  # not -1: 0 rows fail


def dequant_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int,
                dtype: torch.dtype) -> torch.Tensor:
    """qweight [..., in, out/8]; qzeros [..., in/G, out/8]; scales [..., in/G, out] -> W^T [..., out, in] in dtype
    (the F.linear layout)."""
    q = unpack_int4(qweight, AWQ_ORDER)
    z = unpack_int4(qzeros, AWQ_ORDER).repeat_interleave(group, dim=-2)
    w = (q - z).float() * scales.float().repeat_interleave(group, dim=-2)  # one rounding, to dtype at the end
    return w.to(dtype).transpose(-2, -1)


def dequant_ct(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
               group: int, dtype: torch.dtype) -> torch.Tensor:
    """weight_packed [..., out, in/8]; weight_scale [..., out, in/G]; weight_zero_point [..., out/8, in/G] or None
    -> W [..., out, in] in dtype."""
    q = unpack_int4(weight_packed) - 8
    if weight_zero_point is not None:
        zp = unpack_int4(weight_zero_point.transpose(-2, -1)).transpose(-2, -1) - 8  # packed along out
        q = q - zp.repeat_interleave(group, dim=-1)
    return (q.float() * weight_scale.float().repeat_interleave(group, dim=-1)).to(dtype)


KPACK_SPAN = 64  # K rows per span of the kernels' K-packed int4 layout: int32 row 8b + r holds k = 64b + 8j + r
# at nibble j


def awq_to_kpack(qweight: torch.Tensor) -> torch.Tensor:
    """AWQ qweight [..., K, N/8] -> the same int4 values in the kernels' K-packed layout [..., K/8, N] int32: inside
    each span of 64 rows, int32 row r of column n holds rows 8j + r at bits 4j (j = 0..7). K % 64 == 0.
    A decode GEMV then reads 8 input channels per int32 of one column, and each nibble j of a span's 8 rows meets one
    contiguous run of 8 activations (kernels/int4_gemm/kpack.py)."""
    q = unpack_int4(qweight, AWQ_ORDER)  # [..., K, N]
    *lead, k, n = q.shape
    if k % KPACK_SPAN:
        raise ValueError(f"the K-packed int4 layout needs in_features in multiples of {KPACK_SPAN}, got {k}")
    q = q.reshape(*lead, k // KPACK_SPAN, 8, 8, n).permute(*range(len(lead)), -4, -2, -1, -3)  # [.., span, r, n, j]
    return pack_int4(q).reshape(*lead, k // 8, n)  # nibble j at bits 4j


def kpack_to_awq(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of awq_to_kpack: [..., K/8, N] int32 -> AWQ qweight [..., K, N/8]."""
    *lead, k8, n = packed.shape
    q = unpack_int4(packed).reshape(*lead, k8 // 8, 8, n, 8)  # [..., span, r, n, j]
    q = q.permute(*range(len(lead)), -4, -1, -3, -2).reshape(*lead, k8 * 8, n)  # rows 64b + 8j + r
    return pack_int4(q, AWQ_ORDER)


MMA_TILE_N, MMA_SPAN = 16, 64  # the fragment layout's output columns per warp tile and input rows per 16-byte load


def awq_to_mma(qweight: torch.Tensor) -> torch.Tensor:
    """AWQ qweight [K, N/8] -> the same int4 values in the tensor-core GEMV's fragment layout [N/16, K/64, 32, 4] int32
    (kernels/int4_gemm/mma.py). Warp tile nt holds columns 16nt..16nt+15; in each 64-row span kk, lane 4g + t reads one
    16-byte vector: element c is the A fragment of one mma.m16n8k16 (k16 step c), its nibbles at bits 4(mh + 2h) + 16e
    (A register mh + 2h, half e) holding W[64kk + 32h + 8t + 2c + e, 16nt + 8mh + g]. K % 64 == 0, N % 16 == 0."""
    q = unpack_int4(qweight, AWQ_ORDER)  # [K, N]
    k, n = q.shape
    if k % MMA_SPAN or n % MMA_TILE_N:
        raise ValueError(f"the fragment int4 layout needs in_features in multiples of {MMA_SPAN} and out_features in "
                         f"multiples of {MMA_TILE_N}, got {k} x {n}")
    q = q.reshape(k // 64, 2, 4, 4, 2, n // 16, 2, 8).permute(5, 0, 7, 2, 3, 4, 1, 6)  # nt kk g t c | e h mh
    return pack_int4(q.reshape(n // 16, k // 64, 32, 4 * 8)).reshape(n // 16, k // 64, 32, 4)  # nibble mh + 2h + 4e


def mma_to_awq(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of awq_to_mma: [N/16, K/64, 32, 4] int32 -> AWQ qweight [K, N/8]."""
    nt, kk = packed.shape[:2]
    q = unpack_int4(packed).reshape(nt, kk, 8, 4, 4, 2, 2, 2)  # nt kk g t c | e h mh
    return pack_int4(q.permute(1, 6, 3, 4, 5, 0, 7, 2).reshape(kk * 64, nt * 16), AWQ_ORDER)  # kk h t c e | nt mh g


def dequantize(fmt: str, tensors: dict[str, torch.Tensor], group: int, dtype: torch.dtype) -> torch.Tensor:
    """One format's tensors (by checkpoint suffix) -> W [..., out, in] in dtype."""
    if fmt == "awq":
        return dequant_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], group, dtype)
    return dequant_ct(tensors["weight_packed"], tensors["weight_scale"], tensors.get("weight_zero_point"), group,
                      dtype)


def ct_to_awq(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None
              ) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized tensors of one Linear -> the same weight in the AWQ layout {qweight,
    qzeros, scales} the int4 kernels read (bit-exact: dequant_awq of the result == dequant_ct of the input).

    weight_packed [out, in/8]; weight_scale [out, in/G]; weight_zero_point [out/8, in/G] or None (symmetric).
    (q - 8) - (zp - 8) == q - zp with both stored +8, so the stored nibbles carry over and a symmetric weight gets
    the zero point 8. Needs out % 8 == 0 (AWQ packs along out)."""
    out_f = weight_packed.shape[-2]
    if out_f % 8:
        raise ValueError(f"the AWQ layout packs 8 output channels per int32, but this weight has {out_f} outputs")
    q = unpack_int4(weight_packed)  # [out, in], stored +8
    if weight_zero_point is None:
        zp = torch.full_like(weight_scale, 8, dtype=torch.int32)
    else:
        zp = unpack_int4(weight_zero_point.transpose(-2, -1)).transpose(-2, -1)  # [out, in/G], stored +8
    return {"qweight": pack_int4(q.transpose(-2, -1).contiguous(), AWQ_ORDER),
            "qzeros": pack_int4(zp.transpose(-2, -1).contiguous(), AWQ_ORDER),
            "scales": weight_scale.transpose(-2, -1).contiguous()}


def narrowest_exact(scales: torch.Tensor) -> torch.Tensor:
    """scales (fp32 holding fp16 or bf16 values) -> the same values in fp16 or bf16 if either holds them all
    exactly (half the bytes the kernels stream), else unchanged."""
    for dtype in (torch.float16, torch.bfloat16):
        narrow = scales.to(dtype)
        if torch.equal(narrow.float(), scales.float()):
            return narrow
    return scales


def quantize_rtn(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest int4. w: [out, in] float -> (q [out, in] 0..15 int32, zeros [out, in/G] int32,
    scales [out, in/G] fp16), with W ≈ (q - z) * s per group of `group` input channels; |W - Ŵ| <= s/2 (+ the
    fp16 rounding of s)."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # keep 0 representable, like AutoAWQ
    scales = ((hi - lo) / 15).clamp(min=1e-5).half()
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, 15)
    q = torch.clamp(torch.round(g / s[..., None]) + zeros[..., None], 0, 15)
    return q.reshape(out_f, in_f).to(torch.int32), zeros.to(torch.int32), scales


def to_awq(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """w: [out, in] -> AutoAWQ gemm tensors {qweight, qzeros, scales} (RTN)."""
    q, z, s = quantize_rtn(w, group)
    return {"qweight": pack_int4(q.t().contiguous(), AWQ_ORDER), "qzeros": pack_int4(z.t().contiguous(), AWQ_ORDER),
            "scales": s.t().contiguous()}


def to_ct(w: torch.Tensor, group: int, zero_point: bool = False) -> dict[str, torch.Tensor]:
    """w: [out, in] -> compressed-tensors pack-quantized tensors (symmetric unless zero_point) (RTN)."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group, group)
    if not zero_point:
        s = (g.abs().amax(-1) / 7.5).clamp(min=1e-5).half()  # symmetric: q in -8..7
        q = torch.clamp(torch.round(g / s.float()[..., None]), -8, 7).reshape(out_f, in_f)
        return {"weight_packed": pack_int4(q + 8), "weight_scale": s}
    q, z, s = quantize_rtn(w, group)  # unsigned 0..15 with zero z  ==  signed (q-8) with zero (z-8)
    zp = pack_int4(z.t().contiguous()).t().contiguous()  # packed along out: [out/8, in/G]
    return {"weight_packed": pack_int4(q), "weight_scale": s, "weight_zero_point": zp}
