"""Block-wise FP8 (e4m3) weights as the official Qwen FP8 releases store them, and the layers that hold them.

Format: a quantized Linear keeps `weight` float8_e4m3fn [out, in] and `weight_scale_inv` fp32
[ceil(out/BN), ceil(in/BK)] (config.json `weight_block_size` [BN, BK] = [128, 128]); W = weight * scale_inv per
block. Experts store the same per expert. A module is FP8 when its checkpoint `weight` is F8_E4M3 (see
models/formats.py); routers, gates, norms, embeddings and lm_head stay 16-bit.

`Fp8Linear.forward` runs kernels/fp8_gemm (Triton W8A8 / weight-only GEMM on CUDA, dequantize + F.linear
elsewhere). `Fp8Experts` runs the Triton fused MoE on CUDA (kernels/fused_moe, dequantizing inside its K loop) and
dequantizes every expert for the reference MoE elsewhere.

Tensor parallelism may cut a weight inside a scale block (e.g. 64 of a 128-row block per rank): the shard then
keeps a finer block along the cut dim (`shard_block`, the largest that every cut range is made of whole blocks
of), and each fine block reads the scale of the checkpoint block holding it (`scale_ranges`), so the shard
dequantizes to exactly the rows / columns of the full weight it holds.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels.fp8_gemm import FP8_MAX, dequant_blocks, fp8_linear

FP8_SUFFIXES = ("weight", "weight_scale_inv")  # the tensors one FP8 Linear holds, by checkpoint suffix
FP8_DTYPES = ("F8_E4M3",)  # safetensors header dtypes read as FP8 weights


def scale_shape(out_features: int, in_features: int, block: tuple[int, int]) -> tuple[int, int]:
    """weight_scale_inv's shape for a [out, in] weight in (BN, BK) blocks."""
    return -(-out_features // block[0]), -(-in_features // block[1])


def shard_block(ranges: list[tuple[int, int]], block: int) -> int:
    """The block (channels) of a shard made of `ranges` of a dim quantized in `block`-channel scale blocks: the
    greatest common divisor of `block` and every range's start and length, so no fine block straddles a range or a
    checkpoint block (== block when every cut falls on a block boundary)."""
    return math.gcd(block, *(a for a, _ in ranges), *(b - a for a, b in ranges))


def scale_ranges(ranges: list[tuple[int, int]], block: int) -> list[tuple[int, int]]:
    """The scale rows (along the cut dim) a shard of `ranges` in fine blocks of shard_block(ranges, block) reads:
    one checkpoint block per fine block, in order (repeated where several fine blocks share it), consecutive rows
    merged into one range."""
    fine = shard_block(ranges, block)
    rows = [start // block for a, b in ranges for start in range(a, b, fine)]
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [out, in] float -> (weight float8_e4m3fn [out, in], weight_scale_inv fp32 [ceil(out/BN), ceil(in/BK)])
    with scale_inv = amax(|block|) / 448, so |W - Ŵ| <= 2^-4 |W| + scale_inv · 2^-10 per element (e4m3 keeps 3
    mantissa bits; below 2^-6 · scale_inv it rounds in steps of 2^-9 · scale_inv)."""
    n, k = w.shape
    nb, kb = scale_shape(n, k, block)
    wp = torch.nn.functional.pad(w.float(), (0, kb * block[1] - k, 0, nb * block[0] - n))
    wp = wp.view(nb, block[0], kb, block[1])
    s = wp.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (wp / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nb * block[0], kb * block[1])[:n, :k].contiguous(), s


class Fp8Linear(nn.Module):
    """y = x Wᵀ with W block-FP8; parameters named like the checkpoint's (`weight`, `weight_scale_inv`).

    num_experts: when given, both tensors get a leading [E] dim and only `dequant` is used (by Fp8Experts)."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int],
                 num_experts: int | None = None, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        lead = () if num_experts is None else (num_experts,)
        self.weight = nn.Parameter(torch.empty(lead + (out_features, in_features), dtype=torch.float8_e4m3fn),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(lead + scale_shape(out_features, in_features, self.block), dtype=torch.float32),
            requires_grad=False)
        # a 16-bit bias beside the FP8 weight (attention_bias checkpoints), added after the GEMM
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def keep_scales_fp32(self) -> None:
        """Undo a model-wide .to(dtype) (fp8 counts as floating point): the weight stays e4m3 and the scales fp32
        (checkpoints store them fp32; bf16 would round them)."""
        self.weight.data = self.weight.data.to(torch.float8_e4m3fn)
        self.weight_scale_inv.data = self.weight_scale_inv.data.float()

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        """-> W [(E,) out, in] in dtype."""
        return dequant_blocks(self.weight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, out] in x's dtype."""
        y = fp8_linear(x, self.weight, self.weight_scale_inv, self.block)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"fp8 e4m3, in={self.in_features}, out={self.out_features}, block={list(self.block)}"


class Fp8Experts(nn.Module):
    """All experts of one MoE layer in block FP8, one Fp8Linear [E, ...] per checkpoint projection.

    gate and up load separately, as the checkpoint stores them. On CUDA `to_kernel_layout` then stacks them into one
    `gate_up` [E, 2I, H] for the fused MoE, which dequantizes inside its K loop; where I is not a whole number of
    128-row scale blocks a block would straddle gate and up, so they stay apart and every expert is dequantized to
    16-bit per forward (as on CPU). `dense(dtype)` has the interface of layers.moe.Experts /
    layers.linear.QuantExperts."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, block: tuple[int, int],
                 down_block: tuple[int, int] | None = None):
        """block: gate's and up's (BN, BK); down_block: down's (None: block), which differ where a TP shard
        refined them (shard_block)."""
        super().__init__()
        self.gate_proj = Fp8Linear(hidden_size, intermediate_size, block, num_experts)
        self.up_proj = Fp8Linear(hidden_size, intermediate_size, block, num_experts)
        self.down_proj = Fp8Linear(intermediate_size, hidden_size, down_block or block, num_experts)
        self.gate_up: Fp8Linear | None = None  # the stacked [gate | up] of to_kernel_layout (replaces the two)

    def to_kernel_layout(self) -> None:
        """Once, after loading: stack gate and up (weights and scales) when I is a multiple of the scale block."""
        gate, up = self.gate_proj, self.up_proj
        if self.gate_up is not None or gate.out_features % gate.block[0]:
            return
        e = gate.weight.shape[0]
        with torch.device("meta"):  # parameters replaced below: allocate nothing twice
            stacked = Fp8Linear(gate.in_features, 2 * gate.out_features, gate.block, e)
        for name in FP8_SUFFIXES:
            both = torch.cat([getattr(gate, name).data, getattr(up, name).data], dim=1)
            setattr(stacked, name, nn.Parameter(both, requires_grad=False))
        del self.gate_proj, self.up_proj
        self.gate_up = stacked

    def append_expert(self, gate_up: nn.Module, down: nn.Module) -> bool:
        """Stack one more expert after the E experts, in place (the MoE's shared expert, see layers/moe.py): gate_up
        a fused projection of two block-FP8 Linears gate [I, H] and up [I, H] (FP8 pieces stay apart, see
        linear.mergeable), down an Fp8Linear [H, I], with this layer's blocks and sizes -> whether they were (nothing
        changes otherwise). Before or after to_kernel_layout: a stacked gate_up takes [gate; up] as one expert."""
        pieces = list(gate_up.children())
        if len(pieces) != 2 or not all(type(m) is Fp8Linear for m in (*pieces, down)):
            return False
        gate, up = pieces
        if self.gate_up is not None:  # [gate; up] rows, each a whole number of scale blocks (to_kernel_layout)
            extra = [(self.gate_up, *(torch.cat([getattr(gate, n).data, getattr(up, n).data]) for n in FP8_SUFFIXES),
                      gate.block if gate.block == up.block else None)]
        else:
            extra = [(many, one.weight.data, one.weight_scale_inv.data, one.block)
                     for many, one in ((self.gate_proj, gate), (self.up_proj, up))]
        extra.append((self.down_proj, down.weight.data, down.weight_scale_inv.data, down.block))
        if not all(many.block == block and weight.shape == many.weight.shape[1:]
                   and scale.shape == many.weight_scale_inv.shape[1:] and weight.device == many.weight.device
                   for many, weight, scale, block in extra):
            return False
        for many, weight, scale, _ in extra:
            many.weight = nn.Parameter(torch.cat([many.weight.data, weight[None]]), requires_grad=False)
            many.weight_scale_inv = nn.Parameter(torch.cat([many.weight_scale_inv.data, scale[None]]),
                                                 requires_grad=False)
        return True

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (gate_up [E, 2I, H], down [E, H, I]) in dtype."""
        if self.gate_up is not None:
            return self.gate_up.dequant(dtype), self.down_proj.dequant(dtype)
        gate_up = torch.cat([self.gate_proj.dequant(dtype), self.up_proj.dequant(dtype)], dim=1)
        return gate_up, self.down_proj.dequant(dtype)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; topk_weights [T, k] fp32; topk_ids [T, k] -> [T, H]."""
        from ..kernels.fused_moe import ExpertWeights, fused_moe, fused_moe_fp8

        if self.gate_up is not None:
            gu, dn = self.gate_up, self.down_proj
            return fused_moe_fp8(x, ExpertWeights(weight=gu.weight, scale_inv=gu.weight_scale_inv, block=gu.block),
                                 ExpertWeights(weight=dn.weight, scale_inv=dn.weight_scale_inv, block=dn.block),
                                 topk_weights, topk_ids)
        gate_up, down = self.dense(x.dtype)
        return fused_moe(x, gate_up, down, topk_weights, topk_ids)


def use_fp8_kernels(model: nn.Module) -> None:
    """Put every Fp8Experts of a loaded model in the fused MoE's layout (Fp8Experts.to_kernel_layout); CUDA only:
    the CPU reference dequantizes the checkpoint's layout as loaded."""
    for m in model.modules():
        if isinstance(m, Fp8Experts):
            m.to_kernel_layout()
