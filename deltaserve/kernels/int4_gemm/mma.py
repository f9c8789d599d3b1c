"""Triton int4 GEMV on the tensor cores for T <= 128, over the fragment layout (layers/quant.awq_to_mma).

Why: the K-packed GEMV (kpack.py) spends ~3.9 SASS instructions a weight at T = 1 and its tensor-core form
(`_kpack_dot_kernel`, T = 2..16) ~5, because Triton moves the dequantized tile into tl.dot's operand layout through
shared memory. Here the weight is packed offline in the register order of mma.m16n8k16's A operand: in each 64-row
span a lane loads one 16-byte vector whose 4 int32 are the A fragments of 4 MMAs, so nothing is shuffled. Per int32
(8 weights): 3 shifts + 4 LOP3 make the nibbles 16-bit floats MAGIC + q (the magic-number trick: the nibble fills the
low mantissa bits of 128.0 in bf16 / 1024.0 in fp16, no int->float convert), 4 HADD2 take MAGIC + z off (q - z is
exact in 16 bits), one HMMA multiplies 8 activation rows at once: ~1.6 instructions a weight for T = 1 to 8 alike.
Activations are the MMA's B operand: token g of a block of 8 sits in lanes 4g..4g+3, as bf16 pairs loaded straight
from x (the layout's row order makes each pair contiguous); fp32 accumulation per group, times the group's scale.

The asm runs elementwise over [NB · 32 · warps, 4] tensors, 4 elements a row (pack=4): row i is lane i % 32 of warp
i // 32 % warps (for token block i // (32 · warps)), as the layout Triton picks for 16-byte loads (one vector a row)
gives them, so the MMA's lanes are the rows. Every operand is built with that shape, and x is copied when its rows
are not 16-byte aligned (another load layout).

H200, Triton 3.6, CUDA-graph replays over 400 MB of weights, split sum included, against the K-packed kernels (µs,
2026-12-01): 27B gate|up T = 1 38.3 -> 34.4, T = 4 52.6 -> 36.3; 27B down 21.9 -> 20.6 / 28.4 -> 20.6; 27B o_proj
10.5 -> 10.5 / 14.9 -> 10.7; 35B-A3B out_proj 6.2 -> 6.7 / 8.8 -> 6.9. The same kernel over the K-packed layout
(lanes gathering int32 rows 2t, 2t+1 with 4-byte loads and a PRMT per register) was slower than kpack.py at T = 1
(27B gate|up 39.7, down 24.0): the 16-byte loads are what the layout buys.

More tokens: a program takes NB blocks of 8 tokens (token_blocks: 1 up to 8 tokens, 2 up to 16, then 4), NB rows a
thread. The weight words are loaded once a thread and broadcast to its rows (_per_block); the asm of the NB blocks
shares its inputs, so ptxas keeps one copy of the dequantization (LOP3 count 43 at NB = 1, 46 at NB = 4; 166
registers at NB = 4). Token blocks vary fastest over the grid, so programs sharing a weight tile run together. H200
(do_bench, µs): 27B gate|up T = 32 89.6 / T = 64 151 / T = 128 257 against the K-packed GEMM's 138 / 139 / 235 and
dequantize + cuBLAS 325-331; one program a block (NB = 1, the weights re-read from L2 per block) 117 / 206 / 392.
Beyond MMA_MAX_T the fragment layout dequantizes for cuBLAS (dequant.py).

End to end (benchmarks/int4_layout_ab.py: mixed AWQ, context 1024, K-packed against this layout in one call, ms a
step): Qwen3.5-27B shapes batch 1 8.674 -> 8.106 (115.3 -> 123.4 tok/s; 8.664 -> 7.896 on another day); cut to 16
layers (another call) batch 1 2.655 -> 2.500, 8 3.444 -> 2.927, 32 6.725 -> 5.024, 64 8.917 -> 7.754.

Program (i_b, i_n, i_s): token blocks NB·i_b.. (8 tokens each), warp w covers output columns 16(i_n · NW + w)..+15,
K range i_s (whole 128-row units, the next unit's loads issued before this one's MMAs; the first unit's weights,
zeros and scales before the PDL wait, as no kernel writes them: together with the MoE down's early rows, 35B-A3B (8
layers, batch 1) went 0.666 / 0.663 -> 0.649 / 0.647 ms a step, 27B (16 layers, whose int4 Linears all take this
kernel) 2.482 -> 2.485, H200, 2026-12-02). Groups must be multiples of 128."""
import re

import torch
import triton
import triton.language as tl

from ...layers.quant import MMA_SPAN, MMA_TILE_N
from ..pdl import pdl_args, pdl_start
from .triton import device_sms, split_k_ranges, sum_splits

MMA_UNIT = 128  # K rows between two scale / zero loads (groups are multiples of it): two 64-row spans
_SPAN = tl.constexpr(MMA_SPAN)
_UNIT = tl.constexpr(MMA_UNIT)
MMA_MAX_T = 128  # tokens a launch takes (blocks of 8, the MMA's N); beyond, dequantize + cuBLAS is faster (H200)


def _mma_asm(kind: str, magic: int) -> str:
    """PTX for the 4 MMAs of one 16-byte weight vector (pack=4: each operand is 4 consecutive registers of a row):
    $0-$3 the D fragment out (fp32: column g tokens 2t, 2t+1, column g + 8 tokens 2t, 2t+1); $4-$7 the int32 A
    fragments of k16 steps c = 0..3; $8-$11 / $12-$15 the B registers b0 / b1 of step c (16-bit pairs of x);
    $16 = -(MAGIC + zero of column g) in both halves ($17 the same), $18 for column g + 8; $20-$23 accumulators in."""
    one = "0x3f803f80" if kind == "bf16" else "0x3c003c00"
    mg = f"0x{magic:04x}{magic:04x}"
    s = ["{ .reg .b32 a0, a1, a2, a3, w, one;", f" mov.b32 one, {one};",
         " mov.b32 $0, $20; mov.b32 $1, $21; mov.b32 $2, $22; mov.b32 $3, $23;"]
    for c in range(4):
        # nibbles j, j + 4 (bits 4j, 16 + 4j) -> register a_j; a0, a2 column g, a1, a3 column g + 8
        s.append(f" lop3.b32 a0, ${4 + c}, 0x000f000f, {mg}, 0xea;")
        s += [f" shr.b32 w, ${4 + c}, {4 * j}; lop3.b32 a{j}, w, 0x000f000f, {mg}, 0xea;" for j in (1, 2, 3)]
        s.append(f" fma.rn.{kind}x2 a0, a0, one, $16; fma.rn.{kind}x2 a1, a1, one, $18;"
                 f" fma.rn.{kind}x2 a2, a2, one, $16; fma.rn.{kind}x2 a3, a3, one, $18;")
        s.append(f" mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{$0, $1, $2, $3}}, {{a0, a1, a2, a3}},"
                 f" {{${8 + c}, ${12 + c}}}, {{$0, $1, $2, $3}};")
    return "".join(s) + " }"


_ASM_BF16 = tl.constexpr(_mma_asm("bf16", 0x4300))  # 128.0 in bf16: 7 mantissa bits, room for 0..15
_ASM_FP16 = tl.constexpr(_mma_asm("f16", 0x6400))  # 1024.0 in fp16
_CONSTRAINTS = tl.constexpr("=f,=f,=f,=f," + ",".join(["r"] * 16) + ",f,f,f,f")


@triton.jit
def _unit_weights(p_q, p_z, p_s, k0, k_hi, stride_zk, stride_sk, m_q, GROUP: tl.constexpr):
    """The weight loads of the 128-row unit at k0 (none at or past k_hi): the row's two weight vectors (spans 0, 1)
    and the zero words and scales of the row's columns."""
    m_w = m_q & (k0 < k_hi)
    i_g = k0 // GROUP
    return (tl.load(p_q + (k0 // _SPAN) * 128, mask=m_w, other=0),
            tl.load(p_q + (k0 // _SPAN) * 128 + 128, mask=m_w, other=0),
            tl.load(p_z + i_g * stride_zk, mask=m_w, other=0), tl.load(p_s + i_g * stride_sk, mask=m_w, other=0.0))


@triton.jit
def _unit_x(p_x, k0, k_hi, m_x):
    """The activation loads of the unit at k0: the B registers b0 / b1 of each span (x rows 32h + 8t + 2c + {0, 1}
    of a span are its int32 pair 16h + 4t + c)."""
    m_b = m_x & (k0 < k_hi)
    p = p_x + k0 // 2
    return (tl.load(p, mask=m_b, other=0), tl.load(p + 16, mask=m_b, other=0),
            tl.load(p + 32, mask=m_b, other=0), tl.load(p + 48, mask=m_b, other=0))


@triton.jit
def _per_block(v, NB: tl.constexpr):
    """A thread's [32·NW, 4] value -> [NB·32·NW, 4], the same in each of its NB token-block rows (in registers: the
    rows of a block are the threads, as in v)."""
    return tl.reshape(tl.broadcast_to(v[None, :, :], (NB, v.shape[0], 4)), (NB * v.shape[0], 4))


@triton.jit
def _unit_mma(q0, q1, b00, b01, b10, b11, zw, sc, sh, NB: tl.constexpr, FP16: tl.constexpr):
    """-> the unit's 8 MMAs a token block [NB·NW·32, 4] (fp32 D registers, accumulated from 0) times the scales of
    their columns. The weight words (q0, q1, zw, sc: [NW·32, 4]) meet each block's B registers (b*: [NB·NW·32, 4])."""
    z = (zw >> sh) & 0xF
    neg_magic: tl.constexpr = 0xE400 if FP16 else 0xC300  # -1024 in fp16, -128 in bf16
    asm: tl.constexpr = _ASM_FP16 if FP16 else _ASM_BF16
    nz = _per_block((neg_magic | z) | ((neg_magic | z) << 16), NB)  # -(MAGIC + z) in both 16-bit halves: q - z, exact
    d = tl.zeros(b00.shape, dtype=tl.float32)
    d = tl.inline_asm_elementwise(asm, _CONSTRAINTS, [_per_block(q0, NB), b00, b01, nz, d], dtype=tl.float32,
                                  is_pure=True, pack=4)
    d = tl.inline_asm_elementwise(asm, _CONSTRAINTS, [_per_block(q1, NB), b10, b11, nz, d], dtype=tl.float32,
                                  is_pure=True, pack=4)
    return _per_block(sc.to(tl.float32), NB) * d


@triton.jit
def _mma_gemv_kernel(x32, qweight, qzeros, scales, out, T, N, K, K_PER_SPLIT, stride_xt32, stride_zk, stride_sk,
                     stride_os, stride_ot, GROUP: tl.constexpr, NW: tl.constexpr, NB: tl.constexpr,
                     FP16: tl.constexpr, USE_PDL: tl.constexpr = False):
    """x32: x [T, K] as int32 pairs; qweight [N/16, K/64, 32, 4]; qzeros [K/G, N/8] (AWQ); scales [K/G, N];
    out: [S, T, N] fp32 partials, or [T, N] in x's dtype when S = 1. Program (i_b, i_n, i_s): module docstring."""
    i_b, i_n, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_c = tl.arange(0, 4)
    # the weights: one row a thread ([32·NW, 4])
    o_i = tl.arange(0, NW * 32)
    tile = i_n * NW + o_i // 32
    m_q = (tile < N // 16)[:, None] & (o_c < 4)[None, :]
    col = tile[:, None] * 16 + (o_i % 32 // 4)[:, None] + 8 * (o_c // 2)[None, :]  # D register c: column g + 8(c // 2)
    sh = (((col % 8) >> 1) + ((col % 8) & 1) * 4) * 4  # the column's nibble in its AWQ zero word
    p_q = qweight + (tile.to(tl.int64) * (K // _SPAN) * 128 + o_i % 32 * 4)[:, None] + o_c[None, :]
    p_z = qzeros + col // 8
    p_s = scales + col
    # activations and outputs: NB rows a thread, row r the thread r % (32·NW)'s row for token block r // (32·NW)
    o_r = tl.arange(0, NB * NW * 32)
    blk = i_b * NB + o_r // (NW * 32)
    lane = o_r % 32
    t = lane % 4
    row = 8 * blk + lane // 4  # the token whose activations this lane holds in the B operand
    m_x = (row < T)[:, None] & (o_c < 4)[None, :]
    p_x = x32 + (row.to(tl.int64) * stride_xt32 + 4 * t)[:, None] + o_c[None, :]
    k_lo = i_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    # the first unit's weights before the PDL wait (no kernel writes them); x is the launch right before's
    q0, q1, zw, sc = _unit_weights(p_q, p_z, p_s, k_lo, k_hi, stride_zk, stride_sk, m_q, GROUP)
    pdl_start(USE_PDL)
    b_out = tl.zeros([NB * NW * 32, 4], dtype=tl.float32)
    b00, b01, b10, b11 = _unit_x(p_x, k_lo, k_hi, m_x)
    for k0 in range(k_lo, k_hi, _UNIT):  # the next unit's loads go out before this unit's MMAs
        n0, n1, nzw, nsc = _unit_weights(p_q, p_z, p_s, k0 + _UNIT, k_hi, stride_zk, stride_sk, m_q, GROUP)
        c00, c01, c10, c11 = _unit_x(p_x, k0 + _UNIT, k_hi, m_x)
        b_out += _unit_mma(q0, q1, b00, b01, b10, b11, zw, sc, sh, NB, FP16)
        q0, q1, b00, b01, b10, b11, zw, sc = n0, n1, c00, c01, c10, c11, nzw, nsc
    tok = 8 * blk[:, None] + 2 * t[:, None] + (o_c % 2)[None, :]  # D register c: token 2t + c % 2 of the block
    p_o = out + i_s * stride_os + tok.to(tl.int64) * stride_ot + _per_block(col, NB)
    tl.store(p_o, b_out.to(out.dtype.element_ty), mask=_per_block(m_q, NB) & (tok < T))


def mma_split(n: int, k: int, num_sms: int = 132, blocks: int = 1) -> int:
    """Programs along K: ~20 warps of 16 columns an SM over all `blocks` token-block programs, at least 4 warps a
    column tile, whole 128-row units. H200 sweep at T <= 8 (27B gate|up 2 176 column tiles: 4 splits best; down and
    o_proj 320 tiles: 8; 35B-A3B out_proj 128 tiles: 16-32)."""
    return max(1, min(k // MMA_UNIT, max(triton.cdiv(4, blocks), triton.cdiv(20 * num_sms, n // MMA_TILE_N * blocks))))


def token_blocks(t: int) -> int:
    """Blocks of 8 tokens a program takes (NB): one below 16 tokens, then 2, then 4."""
    return 1 if t <= 8 else 2 if t <= 16 else 4


def check_mma_tensors(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      group: int) -> tuple[int, int]:
    """-> (N, K) after checking the fragment-layout tensors against x [T, K]."""
    if x.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)} must be [T, K]")
    k = x.shape[1]
    n = qweight.shape[0] * MMA_TILE_N
    if group % MMA_UNIT or k % group:
        raise ValueError(f"group_size {group} must be a multiple of {MMA_UNIT} dividing K={k}")
    want = {"qweight": (qweight, (n // MMA_TILE_N, k // MMA_SPAN, 32, 4)), "qzeros": (qzeros, (k // group, n // 8)),
            "scales": (scales, (k // group, n))}
    for name, (tensor, shape) in want.items():
        if tuple(tensor.shape) != shape or not tensor.is_contiguous() or tensor.device != x.device:
            raise ValueError(f"{name} {tuple(tensor.shape)} on {tensor.device} must be a contiguous {list(shape)} on "
                             f"{x.device} (fragment-layout int4, x is {tuple(x.shape)})")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError("qweight / qzeros must be int32")
    return n, k


def mma_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int, nb: int | None = None) -> torch.Tensor:
    """x: [T <= MMA_MAX_T, K] fp16/bf16 on CUDA; qweight [N/16, K/64, 32, 4] int32 (layers/quant.awq_to_mma); qzeros
    [K/G, N/8] int32 (AWQ); scales [K/G, N] -> [T, N] in x's dtype."""
    if x.dim() != 2 or x.shape[0] > MMA_MAX_T or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the tensor-core int4 GEMV takes x [T <= {MMA_MAX_T}, K] fp16/bf16 on CUDA, got "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    n, k = check_mma_tensors(x, qweight, qzeros, scales, group_size)
    t = x.shape[0]
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    nb = nb or token_blocks(t)
    blocks = triton.cdiv(t, 8 * nb)
    k_per_split, split = split_k_ranges(k, MMA_UNIT, mma_split(n, k, device_sms(x.device), blocks))
    dst = out if split == 1 else torch.empty(split, t, n, dtype=torch.float32, device=x.device)
    if x.data_ptr() % 16 or x.stride(0) % 8 or x.stride(1) != 1:
        x = x.clone(memory_format=torch.contiguous_format)  # 16-byte rows: the layout check_rows_are_threads wants
    x32 = x.view(torch.int32)  # bf16 pairs as int32
    nw = 4
    kernel = _mma_gemv_kernel[(blocks, triton.cdiv(n // MMA_TILE_N, nw), split)](
        x32, qweight, qzeros, scales, dst, t, n, k, k_per_split, x32.stride(0), qzeros.stride(0), scales.stride(0),
        dst.stride(0) if split > 1 else 0, dst.stride(-2), GROUP=group_size, NW=nw, NB=nb,
        FP16=x.dtype == torch.float16, num_warps=nw, num_stages=1, **pdl_args(x))
    check_rows_are_threads(kernel)
    return out if split == 1 else sum_splits(dst, out)


_CHECKED: set[int] = set()


def check_rows_are_threads(kernel, what: str = "the tensor-core int4 GEMV",
                           off: str = "DELTASERVE_INT4_MMA=0 to use the K-packed kernels") -> None:
    """The MMA's lanes (and any asm that treats a row's 4 elements as one thread's registers) are the asm's tensor
    rows only under a layout with one row a thread (threadsPerWarp [32, 1], sizePerThread [1, 4] or [1, 1]): read it
    from the compiled kernel's TTGIR, once per compiled variant, so a Triton that lays the tensors out otherwise fails
    loudly instead of mixing lanes. what / off: the kernel's name and the switch that avoids it, for the error."""
    if id(kernel) in _CHECKED:
        return
    ttgir = getattr(kernel, "asm", {}).get("ttgir") if kernel is not None else None
    if ttgir is None:
        return
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<.*>)$", ttgir, re.M))
    used = set(re.findall(r"tt\.elementwise_inline_asm.*tensor<\d+x4xf32, (#\w+)>", ttgir))
    for name in used:
        spec = layouts.get(name, "")
        if "threadsPerWarp = [32, 1]" not in spec or not re.search(r"sizePerThread = \[1, [14]\]", spec):
            raise RuntimeError(f"{what} needs one tensor row a thread, but this Triton ({triton.__version__}) laid "
                               f"its asm operands out as {spec or name}; set {off}")
    _CHECKED.add(id(kernel))
