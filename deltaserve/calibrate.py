"""Activation-aware scales for `deltaserve quantize --calib FILE` (AWQ's per-input-channel scale search).

Each decoder layer has two RMSNorms whose output every following Linear reads: `input_layernorm` (q/k/v or the four
GDN in-projections) and `post_attention_layernorm` (gate/up, or the router, experts and shared expert). For each,
a per-channel scale s = mean|X|^alpha (normalised) is searched over alpha in [0, 1]: the consumers' weight columns
are multiplied by s before round-to-nearest and the norm's output is divided by s (folded into its weight:
(1 + w) / s - 1), which leaves the 16-bit model unchanged and moves quantization error onto the channels with
small activations. alpha = 0 (s = 1, plain RTN) is in the grid, so the chosen scales never do worse than RTN on the
calibration activations. Simplifications against AutoAWQ: o_proj, out_proj and down_proj (whose inputs come from
no foldable norm) stay plain RTN, and experts are scored on all calibration tokens, not only those routed to them.
The calibration run loads the whole 16-bit model on the CPU in float32.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

CONSUMERS = {  # norm -> the Linears (checkpoint module names after `layers.L.`) that read its output
    "input_layernorm": r"self_attn\.(q|k|v)_proj|linear_attn\.in_proj_(qkv|z|a|b)",
    "post_attention_layernorm": r"mlp\.(gate_proj|up_proj|gate)|mlp\.experts\.\d+\.(gate|up)_proj|"
                                r"mlp\.shared_expert\.(gate|up)_proj|mlp\.shared_expert_gate",
}
ALPHAS = [i / 20 for i in range(21)]


@dataclass
class NormScale:
    scale: torch.Tensor  # [hidden] fp32: consumer columns x scale, norm output / scale
    alpha: float
    loss_rtn: float  # calibration-output MSE of the quantized consumers with s = 1
    loss: float  # the same with the chosen scale (<= loss_rtn)


_CHARS_PER_TOKEN = 64  # characters read per calibration token wanted: far more than any text needs


def collect_inputs(src: str, calib_file: str, max_tokens: int = 512) -> dict[str, torch.Tensor]:
    """Run the 16-bit model on the calibration text -> `layers.L.<norm>` -> its output rows [T, hidden] fp32."""
    from .llm import LLM
    from .sampling_params import SamplingParams

    try:  # a prefix: only max_tokens are kept, and tokenizing a whole 60 MB corpus took 92 s and 10 GB
        with open(calib_file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is no calibration text
            text = f.read(_CHARS_PER_TOKEN * max_tokens)
    except UnicodeDecodeError as e:
        raise ValueError(f"--calib {calib_file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    # checked before the model is loaded: NUL bytes (zero-filled or UTF-16 files decode as UTF-8) and blank files
    # were calibrated on as if text
    if "\x00" in text:
        raise ValueError(f"--calib {calib_file} is not a text file (it holds NUL bytes, the first at character "
                         f"{text.index(chr(0))}); give it plain UTF-8 text")
    if not text.strip():
        raise ValueError(f"--calib {calib_file} holds no text (it is empty or only whitespace); give it a few "
                         f"paragraphs")
    from .config import ModelConfig

    max_tokens = min(max_tokens, ModelConfig.from_hf_dir(src).max_position_embeddings - 8)  # a short-context model
    llm = LLM(model=src, device="cpu", dtype="float32", max_model_len=max_tokens + 8, num_kv_blocks=64,
              max_num_seqs=1)
    if llm.tokenizer is None:
        raise ValueError(f"--calib needs the source's tokenizer to read {calib_file}, and {src} has no "
                         f"tokenizer.json; copy it there, or quantize without --calib (RTN)")
    ids = llm.tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"--calib {calib_file} holds fewer than 2 tokens of text; give it a few paragraphs")
    rows: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(llm.model.layers):
        for norm in CONSUMERS:
            def hook(_m, _inp, out, key=f"layers.{i}.{norm}"):
                rows.setdefault(key, []).append(out[0].detach().float())
            hooks.append(getattr(layer, norm).register_forward_hook(hook))
    try:
        llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in rows.items()}


def search_scales(inputs: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], quantized: set[str],
                  group: int) -> dict[str, NormScale]:
    """inputs: `layers.L.<norm>` -> X [T, hidden]; weights: checkpoint module (stripped) -> W [out, in]; quantized:
    the modules that will be int4 -> `layers.L.<norm>` -> the best scale (only norms with a quantized consumer)."""
    out = {}
    for key, x in inputs.items():
        layer, norm = key.rsplit(".", 1)
        pattern = re.compile(rf"^{re.escape(layer)}\.({CONSUMERS[norm]})$")
        ws = [weights[m].float() for m in sorted(weights) if pattern.match(m) and m in quantized]
        if ws:
            out[key] = _search(x, ws, group)
    return out


def _search(x: torch.Tensor, ws: list[torch.Tensor], group: int) -> NormScale:
    from .layers.quant import dequant_awq, to_awq

    mean = x.abs().mean(0).clamp(min=1e-6)
    refs = [x @ w.t() for w in ws]
    best = None
    for alpha in ALPHAS:
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w, ref in zip(ws, refs):
            w_hat = dequant_awq(**to_awq(w * s, group), group=group, dtype=torch.float32) / s
            loss += float((x @ w_hat.t() - ref).pow(2).mean())
        if best is None or loss < best.loss:
            best = NormScale(s, alpha, best.loss_rtn if best else loss, loss)
    return best


def fold(name: str, t: torch.Tensor, scales: dict[str, NormScale]) -> torch.Tensor:
    """A checkpoint tensor (stripped name) with the scales folded in: a norm weight w -> (1 + w) / s - 1 (the
    zero-centred RMSNorm), a consumer weight W -> W · diag(s); anything else unchanged."""
    m = re.match(r"^(?P<layer>layers\.\d+)\.(?P<rest>.+)\.weight$", name)
    if not m:
        return t
    if f"{m['layer']}.{m['rest']}" in scales:
        s = scales[f"{m['layer']}.{m['rest']}"].scale
        return ((1 + t.float()) / s - 1).to(t.dtype)
    for norm, pattern in CONSUMERS.items():
        key = f"{m['layer']}.{norm}"
        if key in scales and re.fullmatch(pattern, m["rest"]):
            return (t.float() * scales[key].scale).to(t.dtype)
    return t
