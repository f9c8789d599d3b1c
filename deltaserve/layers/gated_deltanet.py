"""Gated DeltaNet token mixer (Qwen3.5 `linear_attn`): projections, causal conv + SiLU over [q|k|v], the gated
delta rule with per-sequence recurrent state in the state pool, gated RMSNorm, out_proj."""
import torch
from torch import nn

from ..config import ModelConfig
from ..kernels.causal_conv1d import causal_conv1d_varlen
from ..kernels.gated_delta_rule import gated_delta_rule_varlen, gdn_decode_step
from ..worker.forward_batch import ForwardBatch, GdnPrefill
from .linear import Linear
from .norm import GatedRMSNorm


class DepthwiseConv(nn.Module):
    """Holds the conv weight as [C, W] (HF stores [C, 1, W]; the loader squeezes it)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, width))


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        h = cfg.hidden_size
        # in_proj_qkv ([q (Hk·K) | k (Hk·K) | v (HV·V)]), in_proj_z, in_proj_b, in_proj_a of the checkpoint,
        # stacked: one GEMM instead of four (b and a have only HV rows each: poor GEMVs on their own)
        self.splits = [cfg.conv_dim, self.hv * self.dv, self.hv, self.hv]
        self.in_proj = Linear(h, sum(self.splits), bias=False)
        self.conv1d = DepthwiseConv(cfg.conv_dim, cfg.linear_conv_kernel_dim)
        # Kept in fp32 whatever the model dtype: g = -exp(A_log)·softplus(a + dt_bias) is computed in fp32.
        self.A_log = nn.Parameter(torch.empty(self.hv, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(self.hv, dtype=torch.float32))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = Linear(self.hv * self.dv, h, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, conv_state: torch.Tensor,
                recurrent_state: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden]; conv_state: [S, conv_dim, W-1]; recurrent_state: [S, HV, K, V] fp32 (both updated in
        place at batch.state_slots) -> [T, hidden]."""
        proj = self.project(x)
        return self.finish(self.mix(proj, batch, conv_state, recurrent_state), proj)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        """The token-wise part before the mixing: x [T, hidden] -> (in_proj(x) [T, conv_dim + HV·V + 2·HV],)."""
        return (self.in_proj(x),)

    def mix(self, proj: tuple[torch.Tensor], batch: ForwardBatch, conv_state: torch.Tensor,
            recurrent_state: torch.Tensor) -> torch.Tensor:
        """The part that reads and writes the sequences' states: conv + delta rule -> o [T, HV, V]."""
        t = proj[0].shape[0]
        # views into the projection: every kernel takes a/b by row stride (two copy launches a layer fewer)
        mixed_qkv, _, b, a = proj[0].split(self.splits, dim=-1)
        d = t if batch.is_decode else batch.decode_rows
        # the decode rows and the prefilling ones write their rows of one output (a mixed step copies nothing)
        o = torch.empty(t, self.hv, self.dv, dtype=mixed_qkv.dtype, device=mixed_qkv.device)
        if d:  # one fused kernel: conv-state shift + conv + SiLU + gating + norm + recurrence
            gdn_decode_step(mixed_qkv[:d], self.conv1d.weight, conv_state, a[:d], b[:d], self.A_log, self.dt_bias,
                            recurrent_state, batch.state_slots[:d], self.hk, self.dk, self.dv, out=o[:d])
        if d < t:
            self._chunked(mixed_qkv[d:], a[d:], b[d:], batch.gdn_prefill_part(), conv_state, recurrent_state, o[d:])
        return o

    def finish(self, o: torch.Tensor, proj: tuple[torch.Tensor]) -> torch.Tensor:
        """The token-wise part after the mixing: o [T, HV, V] -> out_proj(norm(o) · silu(z)) [T, hidden]."""
        t = o.shape[0]
        z = proj[0].split(self.splits, dim=-1)[1].view(t, self.hv, self.dv)
        return self.out_proj(self.norm(o, z).reshape(t, -1))

    def _chunked(self, mixed_qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, part: GdnPrefill,
                 conv_state: torch.Tensor, recurrent_state: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The prefilling sequences: varlen causal conv from each one's conv state, then the chunked delta rule.
        mixed_qkv: [P_T, C]; a, b: [P_T, HV] -> o [P_T, HV, V], written into out."""
        t = mixed_qkv.shape[0]
        if part.snapshots:  # the conv state at a snapshot: the W-1 inputs before it (offsets are >= 64 > W-1)
            width = conv_state.shape[2]
            starts = [0]
            for n in part.query_lens_cpu:
                starts.append(starts[-1] + n)
            for i, offset, slot in part.snapshots:
                row = starts[i] + offset
                conv_state[slot] = mixed_qkv[row - width: row].t()
        qkv = causal_conv1d_varlen(mixed_qkv, self.conv1d.weight, conv_state, part.cu_seqlens, part.state_slots,
                                   part.query_lens_cpu)
        q, k, v = qkv.split([self.hk * self.dk, self.hk * self.dk, self.hv * self.dv], dim=-1)
        return gated_delta_rule_varlen(
            q.reshape(t, self.hk, self.dk), k.reshape(t, self.hk, self.dk), v.reshape(t, self.hv, self.dv),
            a, b, self.A_log, self.dt_bias, recurrent_state, part.cu_seqlens, part.state_slots,
            query_lens=part.query_lens_cpu, tables=part.tables, snapshots=part.snapshots, out=out,
        )
