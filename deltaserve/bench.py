"""`deltaserve bench`: prefill and decode speed of the whole engine, each figure next to its bound.

Bounds are measured in the same process: device copy bandwidth (bytes read + written per second) for decode,
whose floor is the bytes a step must touch (weights it uses + KV read + GDN state read and written); bf16 GEMM
rate for prefill, whose floor is its FLOPs. `--preset` builds random weights of a published shape directly on the
device; `--model DIR` loads a checkpoint.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .layers.quant import QUANT_SUFFIXES

V = 248320
_GDN = dict(linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4)
_ROPE = {"rope_theta": 10000000.0, "partial_rotary_factor": 0.25}
_PACKED_WEIGHTS = ("qweight", "weight_packed")  # int4 tensors holding the weights themselves, 8 per int32
PRESETS = {
    "qwen3.5-9b": ("Qwen3_5ForCausalLM", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=16,
                                              num_key_value_heads=4, linear_num_value_heads=32,
                                              intermediate_size=12288)),
    "qwen3.5-27b": ("Qwen3_5ForCausalLM", dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=24,
                                               num_key_value_heads=4, linear_num_value_heads=48,
                                               intermediate_size=17408)),
    "qwen3.5-35b-a3b": ("Qwen3_5MoeForCausalLM", dict(hidden_size=2048, num_hidden_layers=40,
                                                      num_attention_heads=16, num_key_value_heads=2,
                                                      linear_num_value_heads=32, num_experts=256,
                                                      num_experts_per_tok=8, moe_intermediate_size=512,
                                                      shared_expert_intermediate_size=512)),
}


def preset_config(name: str, num_layers: int | None = None) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    arch, fields = PRESETS[name]
    raw = dict(_GDN, **fields, architectures=[arch], vocab_size=V, head_dim=256, rms_norm_eps=1e-6,
               max_position_embeddings=262144, rope_parameters=_ROPE, eos_token_id=248044, dtype="bfloat16")
    if num_layers is not None:
        raw["num_hidden_layers"] = num_layers
    return ModelConfig.from_dict(raw, source=f"preset {name}")


@dataclass
class Bounds:
    copy_bytes_per_s: float  # device copy: bytes read + written per second
    gemm_flops_per_s: float  # bf16 matmul


def measure_bounds(device: torch.device) -> Bounds:
    if device.type != "cuda":
        return Bounds(float("nan"), float("nan"))
    n = 1 << 28  # 512 MiB of bf16 each way
    src, dst = torch.empty(n, dtype=torch.bfloat16, device=device), torch.empty(n, dtype=torch.bfloat16, device=device)
    t = time_cuda(lambda: dst.copy_(src), iters=20)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    tg = time_cuda(lambda: a @ a, iters=20)
    return Bounds(2 * n * 2 / t, 2 * 8192**3 / tg)


def time_cuda(fn, iters: int) -> float:
    """Median device seconds of fn() (CUDA events around each call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return sorted(times)[len(times) // 2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes_per_token_step(llm, batch: int) -> float:
    """Weight bytes a decode step of `batch` tokens reads: every parameter as held (int4 Linears: packed int32 +
    scales + zeros) except the embedding table (a gather) and, of each MoE layer's experts, only the ones routed to
    (in expectation E x (1 - (1 - k/E)^batch) of E: at most batch x top-k)."""
    return active_weights(llm.model, llm.config, batch)[0]


def active_weights(model, cfg: ModelConfig, batch: int) -> tuple[float, float]:
    """(bytes read, weights multiplied per token) by a step of `batch` tokens; see weight_bytes_per_token_step.
    An int4 qweight int32 holds 8 weights; its scales and zeros multiply none."""
    dense, experts = [0.0, 0.0], [0.0, 0.0]
    for name, p in model.named_parameters():
        if name == "embed_tokens.weight" and not cfg.tie_word_embeddings:
            continue  # (tied: the same table is the lm_head, read whole)
        kind = name.rpartition(".")[2]
        count = 8 * p.numel() if kind in _PACKED_WEIGHTS else (0 if kind in QUANT_SUFFIXES else p.numel())
        size = p.numel() * p.element_size()
        if ".experts." in name:
            # a shared expert stacked after the E routed ones (layers/moe.fuse_shared_experts) is read every step
            routed = min(p.shape[0], cfg.num_experts) / p.shape[0]
            experts[0], experts[1] = experts[0] + routed * size, experts[1] + routed * count
            dense[0], dense[1] = dense[0] + (1 - routed) * size, dense[1] + (1 - routed) * count
        else:
            dense[0], dense[1] = dense[0] + size, dense[1] + count
    if not cfg.is_moe:
        return dense[0], dense[1]
    # expected share of the E experts that at least one of the batch's tokens routes to (each token picks top-k of E,
    # independently): 1 - (1 - k/E)^batch. batch x k is only its upper bound (at 64 x 8 of 256: all 256 against
    # 222.4 expected), which counted unread experts as bytes the step must move
    touched = 1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** batch
    per_token = cfg.num_experts_per_tok / cfg.num_experts
    return dense[0] + touched * experts[0], dense[1] + per_token * experts[1]


def decode_step_bytes(llm, batch: int, context: int) -> float:
    """Bytes one rank's decode step touches: llm.model is rank 0's shard under TP, so its KV and GDN states are
    counted from the runner's shard config (its KV / value heads), not the full model's."""
    from .worker.model_runner import kv_bytes_per_block, state_bytes_per_slot

    local = llm.runner.cfg
    kv_per_token = kv_bytes_per_block(local, 1, llm.dtype, llm.kv_cache_dtype)  # quantized: codes + scales
    state = state_bytes_per_slot(local, llm.dtype, llm.runner.caches.recurrent[0].dtype
                                 if llm.runner.caches.recurrent else torch.float32)
    return weight_bytes_per_token_step(llm, batch) + batch * (context * kv_per_token + 2 * state)


def bench_decode(llm, batch: int, context: int, steps: int) -> float:
    """Seconds per decode step with `batch` sequences at about `context` tokens each."""
    return decode_step_times(llm, batch, context, steps)[0]


def decode_step_times(llm, batch: int, context: int, steps: int) -> tuple[float, list[float]]:
    """(seconds per decode step over `steps` steps with `batch` sequences at about `context` tokens each, from the
    first step's start to the device's end; each step's own wall time, seconds). Under async scheduling a step's
    wall time is the host's launch of it plus its wait for the step before: the gaps a streaming client sees."""
    from .sampling_params import SamplingParams

    eng = llm.engine
    # no finish before max_model_len: while the batch's prompts are prefilled in chunks, the first ones already decode
    params = SamplingParams(temperature=0, max_tokens=llm.max_model_len - context, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    ids = [eng.add_request(torch.randint(0, llm.config.vocab_size, (context,), generator=g).tolist(), params)
           for _ in range(batch)]
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    for _ in range(3):  # warm-up decode steps
        eng.step()
    _sync(llm.device)
    each = []
    t = time.perf_counter()
    for _ in range(steps):
        t_step = time.perf_counter()
        eng.step()
        each.append(time.perf_counter() - t_step)
    _sync(llm.device)
    dt = (time.perf_counter() - t) / steps
    _check_whole_batch(llm, batch, context, steps)
    for rid in ids:
        eng.abort(rid)
    return dt, each


def _check_whole_batch(llm, batch: int, context: int, steps: int) -> None:
    """Every sequence of the batch is still decoding: a KV cache too small for the batch preempts some, and the
    timed steps would be of a smaller batch than the row says."""
    running = len(llm.engine.scheduler.running)
    if llm.engine.scheduler.waiting:
        raise ValueError(f"decode at batch {batch}: only {running} sequences fit in the KV cache "
                         f"({llm.runner.num_kv_blocks} blocks) with {context} + {steps} tokens each; lower the batch "
                         f"sizes or --context, or raise --num-kv-blocks / --gpu-memory-utilization")
    if running != batch:
        raise ValueError(f"decode at batch {batch}: {batch - running} sequences reached max_model_len "
                         f"{llm.max_model_len} before the timed steps ended; raise --max-model-len")


def bench_prefill(llm, length: int, count: int = 1, repeats: int = 3) -> float:
    """Seconds to prefill `count` prompts of `length` tokens each, submitted together (until every first token;
    best of repeats)."""
    from .sampling_params import SamplingParams

    g = torch.Generator().manual_seed(length)
    prompts = [{"prompt_token_ids": torch.randint(0, llm.config.vocab_size, (length,), generator=g).tolist()}
               for _ in range(count)]
    llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
    best = float("inf")
    for _ in range(repeats):
        _sync(llm.device)
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
        _sync(llm.device)
        best = min(best, time.perf_counter() - t)
    return best


def prefill_flops(cfg: ModelConfig, llm, length: int) -> float:
    """2 x (weights a token multiplies) x tokens, plus causal attention QK^T and PV in full-attention layers and the
    GDN state products. The lm_head (the embedding, when tied) multiplies only the prompt's last row: a prefill
    samples one token, so the runner computes logits for that row alone (ModelRunner.plan's logits_rows)."""
    active = active_weights(llm.model, cfg, 1)[1]
    head = (llm.model.embed_tokens if cfg.tie_word_embeddings else llm.model.lm_head).weight.numel()
    attn = len(cfg.full_attention_layers) * 2 * 2 * cfg.num_attention_heads * cfg.head_dim * length * length / 2
    # the gated delta rule's own products per token and value head: S^T k, k v'^T and S^T q over the K x V state
    # (the chunked form adds its in-chunk C x C products on top of these)
    gdn = (len(cfg.linear_attention_layers) * cfg.linear_num_value_heads * 3 * 2 * cfg.linear_key_head_dim
           * cfg.linear_value_head_dim * length)
    return 2 * (active - head) * length + 2 * head + attn + gdn


def run_bench(llm, prompt_lens: list[int], batch_sizes: list[int], context: int, steps: int,
              progress: bool = True, prefill_count: int = 1) -> list[dict]:
    bounds = measure_bounds(llm.device)
    rows = []
    jobs = [("prefill", n) for n in prompt_lens] + [("decode", b) for b in batch_sizes]
    from tqdm import tqdm

    for kind, n in tqdm(jobs, desc="bench", disable=not progress):
        if kind == "prefill":
            t = bench_prefill(llm, n, prefill_count)
            bound = prefill_count * prefill_flops(llm.config, llm, n) / bounds.gemm_flops_per_s
            rows.append(dict(kind=kind, size=f"{prefill_count}x{n}" if prefill_count > 1 else n, ms=t * 1e3,
                             tok_per_s=prefill_count * n / t, bound_ms=bound * 1e3, fraction_of_bound=bound / t))
        else:
            t, each = decode_step_times(llm, n, context, steps)
            bound = decode_step_bytes(llm, n, context) / bounds.copy_bytes_per_s
            rows.append(dict(kind=kind, size=n, ms=t * 1e3, tok_per_s=n / t, bound_ms=bound * 1e3,
                             fraction_of_bound=bound / t, p99_ms=percentile(each, 99) * 1e3))
    return rows


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile of values (the largest of fewer than 100 at q = 99)."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * q // 100) - 1)]


def format_table(rows: list[dict], header: str) -> str:
    lines = [header, f"{'phase':<8}{'size':>7}{'ms':>11}{'tok/s':>12}{'bound ms':>11}{'of bound':>10}{'p99 ms':>9}"]
    for r in rows:
        bound = f"{r['bound_ms']:>11.3f}{r['fraction_of_bound']:>10.2f}" if r["bound_ms"] == r["bound_ms"] else \
            f"{'n/a':>11}{'n/a':>10}"  # NaN: no bound measured (CPU)
        p99 = f"{r['p99_ms']:>9.3f}" if "p99_ms" in r else f"{'':>9}"
        lines.append(f"{r['kind']:<8}{r['size']:>7}{r['ms']:>11.3f}{r['tok_per_s']:>12.1f}{bound}{p99}".rstrip())
    lines.append("size: prompt tokens [x prompts] (prefill) or batch size (decode); bound: FLOPs / measured GEMM rate for "
                 "prefill, bytes touched / measured copy bandwidth for decode (measured on CUDA only); p99 ms: the "
                 "99th percentile of the timed decode steps' own wall times")
    return "\n".join(lines)
