"""Qwen3.5 (dense and MoE) causal LM over a flat varlen batch.

`config.layer_types[i]` picks each layer's token mixer (Gated DeltaNet or gated full attention); `config.is_moe`
picks the MLP. Caches are owned by the model runner and handed in: one (k, v) pair per full-attention layer and one
(conv, recurrent) state pair per GDN layer, indexed by the layer's position among layers of its kind.
"""
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..kernels.logits import logits as logits_gemm
from ..layers.attention import GatedAttention
from ..layers.embedding import VocabParallelEmbedding
from ..layers.gated_deltanet import GatedDeltaNet
from ..layers.mlp import GatedMLP
from ..layers.moe import SparseMoE
from ..layers.norm import RMSNorm
from ..worker.distributed import SINGLE, TPGroup, expert_range, shard_config, vocab_range
from ..worker.forward_batch import ForwardBatch


@dataclass
class ModelCaches:
    kv: list[tuple]  # per full-attention layer: k, v [num_blocks, block_size, Hkv, D] tensors or QuantizedKV
    conv: list[torch.Tensor]  # per GDN layer: [num_slots, conv_dim, W-1] in the model dtype
    recurrent: list[torch.Tensor]  # per GDN layer: [num_slots, HV, K, V] in the state dtype (fp32 by default)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, experts: tuple[int, int] | None = None):
        """cfg: this rank's shard_config; experts: the router ids of the experts this rank holds (MoE)."""
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = GatedAttention(cfg)
        self.mlp = SparseMoE(cfg, experts) if cfg.is_moe else GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3_5ForCausalLM(nn.Module):
    """Parameter names follow the HF checkpoint with the `model.` / `model.language_model.` prefix dropped.

    Under tensor parallelism (tp.world > 1) this is rank tp.rank's shard: layers are built from shard_config (its
    heads, its MLP / expert columns or, expert parallel, its whole experts), each mixer and each MLP returns a partial
    sum that one all-reduce completes (the MoE's routed and shared-expert parts together); the embedding (one
    all-reduce) and the lm_head (logits all-gathered) are vocab-parallel over the same rows."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE):
        super().__init__()
        self.config, self.tp = cfg, tp
        local = shard_config(cfg, tp.world)
        self.vocab_rows = vocab_range(cfg.vocab_size, tp.rank, tp.world)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        experts = expert_range(local, tp.rank) if cfg.is_moe else None
        self.layers = nn.ModuleList([DecoderLayer(local, t, experts) for t in cfg.layer_types])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, self.vocab_rows[1] - self.vocab_rows[0], bias=False)
        # layer index -> index into ModelCaches.kv or .conv/.recurrent
        self.cache_index = [
            (cfg.linear_attention_layers if t == "linear_attention" else cfg.full_attention_layers).index(i)
            for i, t in enumerate(cfg.layer_types)
        ]

    def forward(self, batch: ForwardBatch, caches: ModelCaches) -> torch.Tensor:
        """-> final-norm hidden states [T, hidden] in the model dtype."""
        residual = self.embed_tokens(batch.input_ids)
        h, residual = self.layers[0].input_layernorm(residual)
        for i, (layer, ci) in enumerate(zip(self.layers, self.cache_index)):
            if i > 0:  # the add of the previous layer's MLP output, fused into this norm
                h, residual = layer.input_layernorm(h, residual)
            if layer.is_linear:
                h = layer.linear_attn(h, batch, caches.conv[ci], caches.recurrent[ci])
            else:
                h = layer.self_attn(h, batch, caches.kv[ci])
            h, residual = layer.post_attention_layernorm(self.tp.all_reduce(h), residual)
            h = self.tp.all_reduce(layer.mlp(h))
        return self.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [M, hidden] -> logits [M, vocab] fp32 (kernels/logits: fp32 accumulators written directly; rounding
        248k logits to bf16 first would cost up to ~0.1 nats in logprobs)."""
        if self.config.tie_word_embeddings:
            weight = self.embed_tokens.weight  # the rank's vocab rows (vocab-parallel embedding)
        else:
            weight = self.lm_head.weight
        logits = logits_gemm(hidden, weight)
        return self.tp.gather_vocab(logits, self.config.vocab_size)
