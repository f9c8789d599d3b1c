"""Tiny random Qwen3.5 checkpoints written by transformers' own save_pretrained, plus HF-side reference numbers.

HF initialises with std 0.02 and zero norms, which makes every logit nearly equal (all near-ties); `spice_`
rescales the weights so activations and logits are O(1) and greedy decoding has clear winners. Not more than that:
with logits ~2x larger these random models amplify fp32 rounding until HF fp32 itself drifts >1e-4 from HF fp64,
and a 1e-4 parity check would measure GEMM blocking, not correctness.
"""
from __future__ import annotations

import math

import torch

transformers = __import__("pytest").importorskip("transformers")

TEXT_BASE = dict(
    vocab_size=384, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, max_position_embeddings=2048, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
)
DENSE = dict(intermediate_size=96)
MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64)

# name -> (HF class name, config class name, is ConditionalGeneration, text overrides, top-level overrides)
VARIANTS = {
    "dense-cond": ("Qwen3_5ForConditionalGeneration", "Qwen3_5Config", True,
                   dict(DENSE, num_hidden_layers=4), {}),
    "moe-cond": ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeConfig", True,
                 dict(MOE, num_hidden_layers=4), {}),
    # irregular layer_types, K != V head dims, HV = 3 Hk, tied embeddings
    "dense-causal-odd": ("Qwen3_5ForCausalLM", "Qwen3_5TextConfig", False,
                         dict(DENSE, num_hidden_layers=5, linear_num_value_heads=6, linear_key_head_dim=16,
                              linear_value_head_dim=24, tie_word_embeddings=True,
                              layer_types=["linear_attention", "full_attention", "linear_attention",
                                           "linear_attention", "full_attention"]), {}),
    "moe-causal": ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeTextConfig", False,
                   dict(MOE, num_hidden_layers=3, layer_types=["linear_attention", "full_attention",
                                                              "linear_attention"]), {}),
    "dense-cond-tied": ("Qwen3_5ForConditionalGeneration", "Qwen3_5Config", True,
                        dict(DENSE, num_hidden_layers=4, tie_word_embeddings=True),
                        dict(tie_word_embeddings=True)),
}


def spice_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tied = model.config.get_text_config().tie_word_embeddings
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "visual" in name:
                continue
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(1.0, 16.0, generator=g).log())
            elif name.endswith("dt_bias"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight") and not tied:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(("lm_head.weight", "embed_tokens.weight")):  # tied: the embedding is the head
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def build_hf(variant: str, seed: int = 0):
    cls_name, cfg_name, cond, text, top = VARIANTS[variant]
    cfg_cls = getattr(transformers, cfg_name)
    text_cfg = dict(TEXT_BASE, **text)
    if cond:
        cfg = cfg_cls(text_config=text_cfg, vision_config=VISION, **top)
    else:
        cfg = cfg_cls(**text_cfg)
    cfg.architectures = [cls_name]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    spice_(model, seed)
    if getattr(model.config, "tie_word_embeddings", False) or text.get("tie_word_embeddings"):
        model.tie_weights()
    return model


def save_hf(model, path: str, max_shard_size: str | None = None) -> str:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


@torch.no_grad()
def hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """-> log-softmax of HF's logits [L, V] fp32 for one sequence."""
    out = model(input_ids=torch.tensor([token_ids]), use_cache=False)
    return torch.log_softmax(out.logits[0].float(), dim=-1)


@torch.no_grad()
def hf_greedy(model, token_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation by recomputing HF's full forward each step (HF's generate() with its cache disagrees
    with its own forward on some of these configs); -> (tokens, top-2 logit gap at each step)."""
    seq, toks, gaps = list(token_ids), [], []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].float()
        top = torch.topk(logits, 2)
        toks.append(int(top.indices[0]))
        gaps.append(float(top.values[0] - top.values[1]))
        seq.append(toks[-1])
    return toks, gaps
