"""`deltaserve make-tiny`: a tiny random Qwen3.5 checkpoint in exactly the Hugging Face layout.

config.json (real architecture names, `text_config` nested, a tiny `vision_config` so HF can instantiate it),
generation_config.json, model.safetensors (names `model.language_model.*`, per-expert MoE tensors, conv weights
[C, 1, W]: what transformers' save_pretrained writes), and a byte-level BPE tokenizer trained here with a
Qwen-style chat template. Weights are scaled so logits are far from uniform: greedy text is random but stable.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .layers.linear import QuantLinear
from .layers.quant import FORMATS
from .models.weights import build_model, unfuse
from .tokenizer import train_tiny_tokenizer


def tiny_config(vocab_size: int, moe: bool, num_layers: int) -> dict:
    text = {
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "vocab_size": vocab_size, "hidden_size": 128, "num_hidden_layers": num_layers,
        "layer_types": ["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(num_layers)],
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
        "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        "attention_bias": False, "dtype": "float32", "eos_token_id": None,
    }
    if moe:
        text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64)
    else:
        text["intermediate_size"] = 256
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5_moe" if moe else "qwen3_5",
        "text_config": text,
        "vision_config": {"model_type": "qwen3_5_moe_vision" if moe else "qwen3_5_vision", "depth": 1,
                          "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 128,
                          "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "tie_word_embeddings": False,
        "dtype": "float32",
    }


def random_init_(model: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights with O(1) activations and logits (see module docstring), drawn on the
    parameters' own device (so benchmarks of large shapes never stage weights on the host). int4 Linears
    (QuantLinear) get random nibbles and scales giving the same O(1) outputs (see _int4_value)."""
    gens: dict[torch.device, torch.Generator] = {}
    quant = {f"{n}.{kind}": m for n, m in model.named_modules() if isinstance(m, QuantLinear) for kind in m.kinds}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            if name in quant:
                p.copy_(_int4_value(quant[name], name.rpartition(".")[2], p.shape, g, p.device))
            else:
                p.copy_(_init_value(name, p.shape, g, p.device))


# var(q - z) for independent uniform nibbles q, z in 0..15: 2 * (16**2 - 1) / 12
_NIBBLE_DIFF_VAR = 2 * 255 / 12


def _int4_value(m: QuantLinear, kind: str, shape: torch.Size, g: torch.Generator, device: torch.device
                ) -> torch.Tensor:
    """One tensor of an int4 Linear: packed tensors are uniform random int32 (8 uniform nibbles each); scales are
    positive, about 1 / sqrt(in_features * var(q - z)) so W = (q - z) * s has the fan-in scaled variance of a
    16-bit weight, and rounded to fp16 as AWQ checkpoints store them (the kernels then stream fp16 scales)."""
    if FORMATS[m.fmt][kind].packed:
        return torch.randint(-2**31, 2**31, shape, generator=g, device=device, dtype=torch.int64).to(torch.int32)
    spread = torch.empty(shape, device=device).uniform_(0.5, 1.5, generator=g)
    return (spread / math.sqrt(m.in_features * _NIBBLE_DIFF_VAR)).half().float()


def _init_value(name: str, shape: torch.Size, g: torch.Generator, device: torch.device) -> torch.Tensor:
    def randn():
        return torch.randn(shape, generator=g, device=device)

    if name.endswith("A_log"):
        return torch.empty(shape, device=device).uniform_(1.0, 16.0, generator=g).log()
    if name.endswith("dt_bias"):
        return 1.0 + 0.5 * randn()
    if name.endswith("linear_attn.norm.weight"):
        return 1.0 + 0.1 * randn()
    if "norm" in name:  # zero-centred RMSNorms: y = x̂ (1 + w)
        return 0.1 * randn()
    if name == "embed_tokens.weight":
        return randn()
    if name == "lm_head.weight":
        return randn() * (1.5 / math.sqrt(shape[-1]))
    return randn() / math.sqrt(shape[-1])  # linear / expert / conv weights: fan-in scaled


def hf_state_dict(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameters under the names and shapes transformers' save_pretrained uses."""
    out = {}
    for name, p in model.named_parameters():
        for hf_name, t in unfuse(name, p.detach(), cfg):
            out.update(_hf_tensors(hf_name, t.contiguous(), cfg))
    return out


def _hf_tensors(name: str, t: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if name == "lm_head.weight":
        return {name: t}
    if name.endswith("conv1d.weight"):
        return {f"model.language_model.{name}": t.unsqueeze(1).contiguous()}
    if name.endswith("experts.gate_up_proj"):
        base, inter = name[: -len("gate_up_proj")], cfg.moe_intermediate_size
        return {f"model.language_model.{base}{e}.{proj}.weight": t[e, rows].contiguous()
                for e in range(cfg.num_experts)
                for proj, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, 2 * inter)))}
    if name.endswith("experts.down_proj"):
        base = name[: -len("down_proj")]
        return {f"model.language_model.{base}{e}.down_proj.weight": t[e].contiguous() for e in range(cfg.num_experts)}
    return {f"model.language_model.{name}": t}


def make_tiny(out_dir: str, moe: bool = False, num_layers: int = 4, seed: int = 0,
              text_overrides: dict | None = None) -> str:
    """Write the tiny checkpoint into out_dir (created if needed); returns out_dir. text_overrides: text_config
    fields to change (e.g. {"num_key_value_heads": 1}), applied before the weights are made."""
    if num_layers < 1:
        raise ValueError(f"--layers must be at least 1, got {num_layers}")
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale(out_dir)
    n_tokens = train_tiny_tokenizer(out_dir)
    vocab = -(-n_tokens // 64) * 64  # padded like real checkpoints; spare rows are never produced by the tokenizer
    raw = tiny_config(vocab, moe, num_layers)
    raw["text_config"].update(text_overrides or {})
    eos = _token_id(out_dir, "<|im_end|>")
    pad = _token_id(out_dir, "<|endoftext|>")
    raw["text_config"]["eos_token_id"] = eos
    cfg = ModelConfig.from_dict(raw)
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    random_init_(model, seed)
    save_file(hf_state_dict(model, cfg), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, "config.json"), raw)
    _write_json(os.path.join(out_dir, "generation_config.json"),
                {"eos_token_id": [eos, pad], "pad_token_id": pad, "do_sample": False})
    return out_dir


# files of an earlier checkpoint in the directory that would be read instead of (or beside) what make_tiny writes
_STALE = ("model.safetensors.index.json", "chat_template.jinja", "chat_template.json")


def _remove_stale(out_dir: str) -> None:
    """Remove an earlier checkpoint's shard index, shards and chat-template files: a sharded checkpoint's other
    weights, or a chat_template.jinja (which wins over tokenizer_config.json), would outlive the rewrite."""
    for name in os.listdir(out_dir):
        if name in _STALE or (name.endswith(".safetensors") and name != "model.safetensors"):
            os.remove(os.path.join(out_dir, name))


def _token_id(out_dir: str, token: str) -> int:
    with open(os.path.join(out_dir, "tokenizer.json")) as f:
        for t in json.load(f)["added_tokens"]:
            if t["content"] == token:
                return t["id"]
    raise RuntimeError(f"tiny tokenizer lacks {token}")


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
