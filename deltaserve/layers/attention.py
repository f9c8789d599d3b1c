"""Gated full attention of Qwen3.5: per-head [query | gate] split, zero-centred q/k norm, partial RoPE, GQA over the
paged KV cache, sigmoid output gate."""
import torch
from torch import nn

from ..config import ModelConfig
from ..kernels.paged_attention import attend, write_kv
from ..kernels.rotary import qk_norm_rope
from ..worker.forward_batch import ForwardBatch
from .linear import Linear
from .norm import RMSNorm


class GatedAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, d, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        # q_proj (per head [query(d) | gate(d)]), k_proj and v_proj of the checkpoint, stacked: one GEMM
        self.qkv_proj = Linear(h, (2 * self.num_heads + 2 * self.num_kv_heads) * d, bias=bias)
        self.o_proj = Linear(self.num_heads * d, h, bias=bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.scale = d ** -0.5
        self.rotary_dim, self.rope_theta, self.eps = cfg.rotary_dim, cfg.rope_theta, cfg.rms_norm_eps

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        """x: [T, hidden]; kv_cache: (k, v) each [NB, BS, Hkv, D] -> [T, hidden]."""
        proj = self.project(x, batch, kv_cache)
        return self.finish(self.mix(proj, batch, kv_cache), proj)

    def project(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The token-wise part before the mixing (reads batch.positions and batch.slot_mapping only): qkv_proj, q/k
        norm and RoPE, the keys and values stored at their cache slots -> (q [T, H, D], gate [T, H, D])."""
        t = x.shape[0]
        hd, kvd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qg, k, v = self.qkv_proj(x).split([2 * hd, kvd, kvd], dim=-1)
        q, gate = qg.view(t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        k, v = k.view(t, self.num_kv_heads, self.head_dim), v.view(t, self.num_kv_heads, self.head_dim)
        q, k = qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, batch.positions, self.rope_theta,
                            self.rotary_dim, self.eps)
        write_kv(k, v, kv_cache[0], kv_cache[1], batch.slot_mapping)
        return q, gate

    def mix(self, proj: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch,
            kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Attention over each sequence's cached keys, gated -> o [T, H, D]."""
        q, gate = proj
        return attend(q, kv_cache[0], kv_cache[1], batch.block_tables, batch.cu_seqlens, batch.context_lens,
                      self.scale, gate, batch.query_lens_cpu, batch.context_lens_cpu, batch.max_context_len,
                      batch.is_decode, batch.decode_rows)

    def finish(self, o: torch.Tensor, proj: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """o [T, H, D] -> o_proj [T, hidden]."""
        return self.o_proj(o.reshape(o.shape[0], -1))
