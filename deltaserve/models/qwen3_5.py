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

    @property
    def mixer(self) -> GatedDeltaNet | GatedAttention:
        return self.linear_attn if self.is_linear else self.self_attn


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
        """-> final-norm hidden states [T, hidden] in the model dtype: the token-wise pieces and the layers' mixers in
        turn (worker/cuda_graph.py replays the pieces from CUDA graphs in small prefill and mixed steps)."""
        carry = self.piece(0, None, (), batch, caches)
        for i in range(len(self.layers)):
            carry = self.piece(i + 1, self.mix(i, carry, batch, caches), carry, batch, caches)
        return carry[0]

    def piece(self, i: int, mixed: torch.Tensor | None, carry: tuple, batch: ForwardBatch, caches: ModelCaches
              ) -> tuple[torch.Tensor, ...]:
        """The token-wise work from layer i-1's mixer to layer i's (i in 0..L): layer i-1's output projection, residual
        add and norm, its MLP, then layer i's input norm and projections. Every row depends on its own token only, and
        of the batch it reads input_ids (i = 0), positions and slot_mapping (an attention layer i: RoPE, KV store).
        mixed: layer i-1's mixer output; carry: piece i-1's result, (residual, *layer i-1's projections).
        -> (residual [T, hidden], *layer i's projections), or (final-norm hidden [T, hidden],) for i = L."""
        if i == 0:
            h, residual = self.layers[0].input_layernorm(self.embed_tokens(batch.input_ids))
        else:
            prev = self.layers[i - 1]
            h = prev.mixer.finish(mixed, carry[1:])
            # the add of the previous layer's output into the residual, fused into each norm
            h, residual = prev.post_attention_layernorm(self.tp.all_reduce(h), carry[0])
            h = self.tp.all_reduce(prev.mlp(h))
            if i == len(self.layers):
                return (self.norm(h, residual)[0],)
            h, residual = self.layers[i].input_layernorm(h, residual)
        layer = self.layers[i]
        if layer.is_linear:
            return (residual, *layer.linear_attn.project(h))
        return (residual, *layer.self_attn.project(h, batch, caches.kv[self.cache_index[i]]))

    def mix(self, i: int, carry: tuple, batch: ForwardBatch, caches: ModelCaches) -> torch.Tensor:
        """Layer i's token mixer over the sequences (their states and KV cache): carry from piece i -> o [T, heads,
        head dim]."""
        layer, ci = self.layers[i], self.cache_index[i]
        if layer.is_linear:
            return layer.linear_attn.mix(carry[1:], batch, caches.conv[ci], caches.recurrent[ci])
        return layer.self_attn.mix(carry[1:], batch, caches.kv[ci])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [M, hidden] -> logits [M, vocab] fp32 (kernels/logits: fp32 accumulators written directly; rounding
        248k logits to bf16 first would cost up to ~0.1 nats in logprobs)."""
        if self.config.tie_word_embeddings:
            weight = self.embed_tokens.weight  # the rank's vocab rows (vocab-parallel embedding)
        else:
            weight = self.lm_head.weight
        logits = logits_gemm(hidden, weight)
        return self.tp.gather_vocab(logits, self.config.vocab_size)
