"""Linear layers in the formats a checkpoint can hold, behind one interface (`forward(x)`), and the fused groups.

Every Linear decides its own format from the checkpoint (models/weights.plan_formats): `Linear` (nn.Linear's
parameters; decode-sized batches on CUDA run the Triton GEMV of kernels/gemv) for 16-bit, `QuantLinear` for int4
(AWQ or compressed-tensors). Our fused projections (q|k|v, the four GDN in-projections, gate|up) stay one `Linear`
GEMM when all their pieces are 16-bit; when any piece is quantized they become a `ProjectionGroup`, one Linear per
checkpoint piece (so the loader fills each from its own tensors), outputs concatenated in the same order.
`merge_projection_runs(model)` then fuses each run of consecutive pieces in one format back into one Linear: one GEMM
per run, and no cat where a single run is left.

int4 on CUDA: the Triton W4A16 kernels (kernels/int4_gemm, kernels/fused_moe) read the AWQ layout or, for groups of
64 or more, the K-packed one (fast decode GEMV); `use_int4_kernels(model)` runs once after loading, rewrites
compressed-tensors weights into AWQ and then K-packs what it can. Elsewhere (CPU, fp32, odd group sizes) the
reference: dequantize the whole weight to x's dtype, then one GEMM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import gemv
from ..kernels.fused_moe import ExpertWeights, fused_moe_int4, fused_moe_reference
from ..kernels.int4_gemm import int4_gemm, kernel_supports, kpack_ok, mma_ok
from .quant import FORMATS, awq_to_kpack, awq_to_mma, ct_to_awq, dequantize, kpack_to_awq, mma_to_awq, narrowest_exact


class Linear(nn.Linear):
    """A 16-bit Linear: nn.Linear's parameters and state-dict names; its forward is kernels/gemv's dispatch (the
    Triton GEMV for up to 16 rows on CUDA, F.linear elsewhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv.linear(x, self.weight, self.bias)


MMA_CHUNK_COLS = 2048  # output columns moved to the fragment layout at a time (27B gate|up: ~80 MB temporaries)
KPACK_CHUNK_ROWS = 1024  # input rows K-packed at a time: each temporary is rows x out int32 (27B gate|up: 140 MB)


class QuantLinear(nn.Module):
    """y = x Wᵀ with W int4 in `fmt` ("awq", "ct" or "ct_zp"); parameters named like the checkpoint's tensors.

    num_experts: when given, every tensor gets a leading [E] dim and `dequant` returns [E, out, in]."""

    def __init__(self, fmt: str, in_features: int, out_features: int, group_size: int,
                 num_experts: int | None = None, bias: bool = False):
        super().__init__()
        self.fmt, self.group_size = fmt, group_size
        self.in_features, self.out_features = in_features, out_features
        lead = () if num_experts is None else (num_experts,)
        self.kinds = tuple(FORMATS[fmt])
        self.kpack = False  # qweight K-packed ([(E,) in/8, out], to_kernel_layout) instead of AWQ's [(E,) in, out/8]
        self.mma = False  # qweight in the fragment layout ([out/16, in/64, 32, 4], to_mma_layout; no experts dim)
        for kind, spec in FORMATS[fmt].items():
            dtype = torch.int32 if spec.packed else torch.float32
            shape = lead + spec.shape(in_features, out_features, group_size)
            self.register_parameter(kind, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))
        # a 16-bit bias beside the int4 weight (attention_bias checkpoints), added after the GEMM
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def keep_scales_fp32(self) -> None:
        """Undo a model-wide .to(dtype) on the scales: fp32 holds the fp16 (AWQ) or bf16 (compressed-tensors) scales
        checkpoints store exactly; bf16 would round them."""
        for kind, spec in FORMATS[self.fmt].items():
            if not spec.packed:
                getattr(self, kind).data = getattr(self, kind).data.float()

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        """-> W [(E,) out, in] in dtype."""
        tensors = {k: getattr(self, k) for k in self.kinds}
        if self.kpack:
            tensors["qweight"] = kpack_to_awq(tensors["qweight"])
        elif self.mma:
            tensors["qweight"] = mma_to_awq(tensors["qweight"])
        return dequantize(self.fmt, tensors, self.group_size, dtype)

    def to_kernel_layout(self) -> None:
        """Once, after loading, for the CUDA kernels: compressed-tensors tensors are rewritten in the AWQ layout
        (bit-exact, one expert at a time to bound the temporaries) and the scales narrowed to fp16/bf16 where that
        holds them exactly (fewer bytes streamed), then qweight is K-packed where the group allows (kpack_ok; one
        expert at a time). A compressed-tensors Linear whose outputs are not a multiple of 8 cannot be packed along
        out: it keeps its format and the reference path."""
        if self.kpack:
            return
        if self.fmt != "awq":
            if self.out_features % 8:
                return
            old = {k: getattr(self, k).data for k in self.kinds}
            lead = tuple(old["weight_packed"].shape[:-2])
            new = {kind: torch.empty(lead + spec.shape(self.in_features, self.out_features, self.group_size),
                                     dtype=torch.int32 if spec.packed else old["weight_scale"].dtype,
                                     device=old["weight_packed"].device) for kind, spec in FORMATS["awq"].items()}
            for idx in ([()] if not lead else [(e,) for e in range(lead[0])]):
                converted = ct_to_awq(old["weight_packed"][idx], old["weight_scale"][idx],
                                      old["weight_zero_point"][idx] if "weight_zero_point" in old else None)
                for kind, tensor in converted.items():
                    new[kind][idx].copy_(tensor)
            for kind in self.kinds:
                delattr(self, kind)
            self.fmt, self.kinds = "awq", tuple(FORMATS["awq"])
            for kind, tensor in new.items():
                self.register_parameter(kind, nn.Parameter(tensor, requires_grad=False))
        self.scales.data = narrowest_exact(self.scales.data)
        if kpack_ok(self.in_features, self.group_size):
            old = self.qweight.data
            packed = torch.empty(old.shape[:-2] + (self.in_features // 8, self.out_features), dtype=torch.int32,
                                 device=old.device)
            rows = KPACK_CHUNK_ROWS  # a multiple of the 64-row span: the temporaries stay ~rows x out int32
            for idx in ([()] if old.dim() == 2 else [(e,) for e in range(old.shape[0])]):
                for k0 in range(0, self.in_features, rows):
                    packed[idx][k0 // 8 : (k0 + rows) // 8].copy_(awq_to_kpack(old[idx][k0 : k0 + rows]))
            self.qweight.data, self.kpack = packed, True

    def to_mma_layout(self) -> bool:
        """Once, after to_kernel_layout and the merges: a plain (no experts dim) K-packed Linear whose shape mma_ok
        allows moves to the fragment layout of the tensor-core decode GEMV (kernels/int4_gemm/mma.py), MMA_CHUNK_COLS
        output columns at a time -> whether it did. Experts stay K-packed (the MoE kernels read that layout)."""
        if not (self.kpack and self.qweight.dim() == 2 and mma_ok(self.in_features, self.out_features,
                                                                  self.group_size)):
            return False
        old = self.qweight.data
        packed = torch.empty(self.out_features // 16, self.in_features // 64, 32, 4, dtype=torch.int32,
                             device=old.device)
        for n0 in range(0, self.out_features, MMA_CHUNK_COLS):
            n1 = min(n0 + MMA_CHUNK_COLS, self.out_features)
            packed[n0 // 16 : n1 // 16].copy_(awq_to_mma(kpack_to_awq(old[:, n0:n1])))
        self.qweight.data, self.kpack, self.mma = packed, False, True
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, out] in x's dtype."""
        if self.fmt == "awq" and kernel_supports(x, self.group_size):
            y = int4_gemm(x.reshape(-1, self.in_features), self.qweight, self.qzeros, self.scales, self.group_size,
                          self.kpack, self.mma)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequant(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.fmt}, in={self.in_features}, out={self.out_features}, group={self.group_size}"


def use_int4_kernels(model: nn.Module) -> None:
    """Put every int4 Linear of a loaded model in the kernels' layouts (QuantLinear.to_kernel_layout); CUDA only:
    the CPU reference reads every format as loaded."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.to_kernel_layout()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the repacking's temporaries, before the KV cache is sized from free memory


def use_int4_mma_layout(model: nn.Module) -> None:
    """After the merges and shared-expert stacking (which join K-packed pieces): move every plain K-packed int4
    Linear that can to the fragment layout (QuantLinear.to_mma_layout); CUDA only, like use_int4_kernels."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.to_mma_layout()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ProjectionGroup(nn.Module):
    """A fused projection whose checkpoint pieces differ in format: one Linear per piece (submodules named like
    the pieces, e.g. `q_proj`), outputs concatenated in piece order along the last dim. After merge_runs a child
    may hold a run of pieces, named like them joined by '+' (e.g. `in_proj_b+in_proj_a`)."""

    def __init__(self, pieces: list[tuple[str, nn.Module]]):
        super().__init__()
        for name, linear in pieces:
            self.add_module(name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, sum of piece outputs]."""
        outs = [linear(x) for linear in self.children()]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def merge_runs(self) -> None:
        """Replace each run of consecutive children that `mergeable` allows to share one Linear by that Linear
        (merge_linears), in place and in order: the output columns stay where they were."""
        runs: list[list[tuple[str, nn.Module]]] = []
        for name, linear in self.named_children():
            if runs and mergeable(runs[-1][-1][1], linear):
                runs[-1].append((name, linear))
            else:
                runs.append([(name, linear)])
        if len(runs) == len(self._modules):
            return
        for name in list(self._modules):
            delattr(self, name)
        for run in runs:
            linears = [linear for _, linear in run]
            self.add_module("+".join(name for name, _ in run),
                            linears[0] if len(linears) == 1 else merge_linears(linears))


def merge_projection_runs(model: nn.Module) -> None:
    """Once, after loading and after use_int4_kernels (every piece in its final layout, e.g. K-packed): merge the
    runs of every ProjectionGroup (ProjectionGroup.merge_runs). A decode step then launches one GEMV per format run
    instead of one per piece plus a cat (e.g. the GDN in-projection of an int4 checkpoint: int4 in_proj_qkv|z and
    16-bit in_proj_b|a, 2 GEMVs instead of 4). Piece names are gone afterwards: load weights before this."""
    for group in [m for m in model.modules() if isinstance(m, ProjectionGroup)]:
        group.merge_runs()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the pieces' old tensors, before the KV cache is sized from free memory


def mergeable(a: nn.Module, b: nn.Module) -> bool:
    """Whether Linears a and b (same input x) can become one whose output is [a(x) | b(x)]: both 16-bit
    (`Linear`) with the same dtype and device and both or neither with a bias, or both int4 QuantLinears of one
    format, group size, layout (kpack) and input width on one device, without an experts dim, every tensor whole
    along out (AWQ packs 8 output channels per int32). Anything else stays apart: FP8 Linears too (merging them
    would need their scale blocks to end at the seam)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, nn.Linear):
        return (a.in_features == b.in_features and a.weight.dtype == b.weight.dtype
                and a.weight.device == b.weight.device and (a.bias is None) == (b.bias is None))
    if type(a) is QuantLinear:
        ta, tb = getattr(a, a.kinds[0]), getattr(b, b.kinds[0])  # qweight / weight_packed: [E, ...] for experts
        return (a.fmt == b.fmt and a.in_features == b.in_features and a.group_size == b.group_size
                and a.kpack == b.kpack and not (a.mma or b.mma) and ta.dim() == tb.dim() == 2
                and ta.device == tb.device
                and (a.bias is None) == (b.bias is None)
                and all(m.out_features % spec.per_out == 0 for m in (a, b) for spec in FORMATS[a.fmt].values()))
    return False


def merge_linears(linears: list[nn.Module]) -> nn.Module:
    """Linears that are pairwise `mergeable` -> one Linear whose output is theirs concatenated in order."""
    if type(linears[0]) is QuantLinear:
        return _merge_quant(linears)
    first = linears[0]
    with torch.device("meta"):  # shapes only: the tensors come from the pieces
        merged = Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None)
    merged.weight = nn.Parameter(torch.cat([m.weight.data for m in linears]), first.weight.requires_grad)  # [out, in]
    if first.bias is not None:
        merged.bias = nn.Parameter(torch.cat([m.bias.data for m in linears]), first.bias.requires_grad)  # [out]
    return merged


def _merge_quant(linears: list[QuantLinear]) -> QuantLinear:
    """int4 pieces -> one QuantLinear: every tensor concatenated along its output-channel dim (FORMATS' out_dim;
    AWQ: qweight [in, out/8], qzeros [in/G, out/8], scales [in/G, out] along dim 1, and K-packing keeps out there:
    [in/8, out]). Scales of different dtypes (use_int4_kernels narrows each piece's on its own) meet in fp32, which
    holds fp16 and bf16 exactly, then narrow again where that is exact."""
    first = linears[0]
    with torch.device("meta"):  # shapes only: the tensors come from the pieces
        merged = QuantLinear(first.fmt, first.in_features, sum(m.out_features for m in linears), first.group_size,
                             bias=first.bias is not None)
    merged.kpack = first.kpack
    if first.bias is not None:
        merged.bias = nn.Parameter(torch.cat([m.bias.data for m in linears]), requires_grad=False)
    for kind, spec in FORMATS[first.fmt].items():
        tensors = [getattr(m, kind).data for m in linears]
        if len({t.dtype for t in tensors}) == 1:
            cat = torch.cat(tensors, dim=spec.out_dim)
        else:
            cat = narrowest_exact(torch.cat([t.float() for t in tensors], dim=spec.out_dim))
        setattr(merged, kind, nn.Parameter(cat, requires_grad=False))
    return merged


def _stackable(many: QuantLinear, one: QuantLinear) -> bool:
    """Whether `one` (no experts dim) can join the experts QuantLinear `many` as one more expert."""
    lead, extra = getattr(many, many.kinds[0]), getattr(one, one.kinds[0])
    return (many.fmt == one.fmt and many.group_size == one.group_size and many.kpack == one.kpack
            and not (many.mma or one.mma)
            and (many.in_features, many.out_features) == (one.in_features, one.out_features)
            and lead.dim() == extra.dim() + 1 and lead.device == extra.device)


class QuantExperts(nn.Module):
    """All experts of one MoE layer in int4: `gate_up_proj` ([E] x [gate | up]) and `down_proj` QuantLinears.

    forward: the int4 fused MoE (kernels/fused_moe.fused_moe_int4: Triton on CUDA once the experts are in the AWQ
    layout, see use_int4_kernels; else every expert dequantized, then the reference)."""

    def __init__(self, fmt: str, num_experts: int, hidden_size: int, intermediate_size: int, group_size: int):
        super().__init__()
        self.gate_up_proj = QuantLinear(fmt, hidden_size, 2 * intermediate_size, group_size, num_experts)
        self.down_proj = QuantLinear(fmt, intermediate_size, hidden_size, group_size, num_experts)

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (gate_up [E, 2I, H], down [E, H, I]) in dtype."""
        return self.gate_up_proj.dequant(dtype), self.down_proj.dequant(dtype)

    def append_expert(self, gate_up: nn.Module, down: nn.Module) -> bool:
        """Stack one more expert after the E experts, in place (the MoE's shared expert, see layers/moe.py): int4
        QuantLinears gate|up [2I, H] and down [H, I] in this layer's format, group size, layout and sizes -> whether
        they were (nothing changes otherwise)."""
        pairs = ((self.gate_up_proj, gate_up), (self.down_proj, down))
        if not all(type(one) is QuantLinear and _stackable(many, one) for many, one in pairs):
            return False
        for many, one in pairs:
            for kind in many.kinds:
                stack, extra = getattr(many, kind).data, getattr(one, kind).data
                if stack.dtype != extra.dtype:  # scales narrowed apart (use_int4_kernels): meet in fp32, exact
                    stack = narrowest_exact(torch.cat([stack.float(), extra.float()[None]]))
                else:
                    stack = torch.cat([stack, extra[None]])
                setattr(many, kind, nn.Parameter(stack, requires_grad=False))
        return True

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; topk_weights [T, k] fp32; topk_ids [T, k] -> [T, H]: the routed experts' weighted sum."""
        if self.gate_up_proj.fmt != "awq" or self.down_proj.fmt != "awq":  # compressed-tensors as loaded (CPU)
            gate_up, down = self.dense(x.dtype)
            return fused_moe_reference(x, gate_up, down, topk_weights, topk_ids)
        gu, dn = self.gate_up_proj, self.down_proj
        return fused_moe_int4(x, ExpertWeights(gu.qweight, gu.qzeros, gu.scales, gu.group_size, kpack=gu.kpack),
                              ExpertWeights(dn.qweight, dn.qzeros, dn.scales, dn.group_size, kpack=dn.kpack),
                              topk_weights, topk_ids)
