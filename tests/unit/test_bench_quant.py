"""`deltaserve bench --quantization awq`: random int4 models in the mixed pattern of Qwen3.5 AWQ checkpoints.

The format plan is checked against a hand-written list of modules, the random int4 weights against the 16-bit
random model's activation scale, and the decode bound's byte count against a count made by hand from the config."""
import dataclasses
import math

import pytest
import torch
from torch import nn

from deltaserve import LLM, SamplingParams, bench, cli
from deltaserve.bench import active_weights, preset_config, weight_bytes_per_token_step
from deltaserve.config import ModelConfig, QuantConfig
from deltaserve.layers.linear import (
    Linear,
    ProjectionGroup,
    QuantExperts,
    QuantLinear,
    use_int4_kernels,
)
from deltaserve.models.formats import AWQ_FULL_16BIT, AWQ_MIXED_16BIT, awq_formats
from deltaserve.models.weights import build_model
from deltaserve.tiny import tiny_config

GROUP = 32
VOCAB = 256


def tiny(moe: bool) -> ModelConfig:
    """4 layers: GDN, GDN, GDN, full attention (tiny.tiny_config)."""
    return ModelConfig.from_dict(tiny_config(VOCAB, moe, 4))


def with_awq(cfg: ModelConfig, group: int = GROUP) -> ModelConfig:
    return dataclasses.replace(cfg, quantization=QuantConfig("awq", 4, group, True, AWQ_MIXED_16BIT))


def random_llm(moe: bool, quantization: str | None, **kw) -> LLM:
    return LLM.from_config(tiny(moe), device="cpu", quantization=quantization, group_size=GROUP, max_num_seqs=8,
                           num_kv_blocks=32, max_model_len=128, **kw)


# ---- which modules are int4 ----

def expected_int4(moe: bool) -> set[str]:
    """By hand: o_proj / out_proj, the MLP (dense) or the shared expert's MLP and every expert (MoE)."""
    names = {"layers.0.linear_attn.out_proj", "layers.1.linear_attn.out_proj", "layers.2.linear_attn.out_proj",
             "layers.3.self_attn.o_proj"}
    for i in range(4):
        if moe:
            names |= {f"layers.{i}.mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
            names |= {f"layers.{i}.mlp.experts.{e}.{p}" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")}
        else:
            names |= {f"layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    return names


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_awq_formats_mark_exactly_the_mixed_pattern(moe):
    assert awq_formats(with_awq(tiny(moe))) == {name: "awq" for name in expected_int4(moe)}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_random_awq_model_is_built_in_the_mixed_pattern(moe):
    mods = dict(random_llm(moe, "awq").model.named_modules())
    assert type(mods["layers.3.self_attn.qkv_proj"]) is Linear  # 16-bit q|k|v: still one fused GEMM
    assert type(mods["layers.0.linear_attn.in_proj"]) is Linear  # 16-bit qkv|z|b|a: still one fused GEMM
    assert isinstance(mods["layers.3.self_attn.o_proj"], QuantLinear)
    assert isinstance(mods["layers.0.linear_attn.out_proj"], QuantLinear)
    assert type(mods["lm_head"]) is nn.Linear
    if moe:  # the shared expert's int4 gate|up and down joined the 8 experts as expert 8 (fuse_shared_experts)
        experts = mods["layers.1.mlp.experts"]
        assert isinstance(experts, QuantExperts) and "layers.1.mlp.shared_expert" not in mods
        assert experts.gate_up_proj.qweight.shape[0] == experts.down_proj.scales.shape[0] == 9
        assert type(mods["layers.1.mlp.gate"]) is Linear
        assert type(mods["layers.1.mlp.shared_expert_gate"]) is Linear
    else:
        assert isinstance(mods["layers.1.mlp.gate_up_proj"], ProjectionGroup)
        assert isinstance(mods["layers.1.mlp.gate_up_proj.gate_proj+up_proj"], QuantLinear)  # int4 gate|up: 1 GEMM
        assert isinstance(mods["layers.1.mlp.down_proj"], QuantLinear)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_awq_full_pattern_keeps_only_the_small_projections_16bit(moe):
    """'awq-full' (what `deltaserve quantize` writes): q/k/v and in_proj_qkv/z join the int4 Linears; in_proj_a/b,
    the router and shared_expert_gate stay 16-bit."""
    cfg = dataclasses.replace(tiny(moe), quantization=QuantConfig("awq", 4, GROUP, True, AWQ_FULL_16BIT))
    more = {f"layers.{i}.linear_attn.{p}" for i in range(3) for p in ("in_proj_qkv", "in_proj_z")}
    more |= {f"layers.3.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")}
    assert awq_formats(cfg, AWQ_FULL_16BIT) == {name: "awq" for name in expected_int4(moe) | more}
    mods = dict(random_llm(moe, "awq-full").model.named_modules())
    qkv = mods["layers.3.self_attn.qkv_proj"]  # q|k|v all int4 (one QuantLinear or a group of them)
    assert {type(m) for m in qkv.modules() if not list(m.children())} == {QuantLinear}
    assert type(mods["lm_head"]) is nn.Linear


@pytest.mark.parametrize("preset", ["qwen3.5-27b", "qwen3.5-35b-a3b"])
def test_full_size_presets_fit_awq_at_group_128(preset):
    """Every int4 Linear of the published shapes takes group 128 (built on the meta device: no memory)."""
    cfg = with_awq(preset_config(preset), 128)
    formats = awq_formats(cfg)
    model = build_model(cfg, torch.device("meta"), torch.bfloat16, formats=formats)
    int4 = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    # o_proj or out_proj, + gate, up, down (dense) or + the shared expert's 3 and the experts' gate_up and down
    assert len(int4) == cfg.num_hidden_layers * (6 if cfg.is_moe else 4)
    assert weight_bytes_per_token_step(_Bare(model, cfg), 1) == pytest.approx(hand_count(cfg, 128, 2, 4, 1), rel=1e-12)


def test_group_size_that_does_not_divide_is_one_clear_error():
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.shared_expert\.down_proj cannot be AWQ int4: group_size 128 "
                                         r"does not divide its in_features 64; pick a group size"):
        awq_formats(with_awq(tiny(True), 128))


@pytest.mark.parametrize("value, match", [("gptq", "quantization='gptq' is not supported"),
                                          ("int4", "use 'awq'")], ids=["gptq", "int4"])
def test_bad_quantization_is_one_clear_error(value, match):
    with pytest.raises(ValueError, match=match):
        LLM.from_config(tiny(False), device="cpu", quantization=value)


def test_bad_group_size_is_one_clear_error():
    with pytest.raises(ValueError, match="group_size must be a positive number of input channels"):
        LLM.from_config(tiny(False), device="cpu", quantization="awq", group_size=0)


# ---- random int4 weights: finite, O(1) ----

def _output_scales(llm: LLM, names: list[str]) -> dict[str, float]:
    """Prefill one prompt; -> RMS of each named module's output."""
    seen: dict[str, float] = {}
    mods = dict(llm.model.named_modules())

    def record(name):
        def hook(module, args, out):  # the first call is the prompt's prefill
            seen.setdefault(name, out.float().pow(2).mean().sqrt().item())
        return hook

    hooks = [mods[n].register_forward_hook(record(n)) for n in names]
    out = llm.generate([{"prompt_token_ids": list(range(3, 40))}],
                       SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0]
    for h in hooks:
        h.remove()
    logprobs = [lp for step in out.prompt_logprobs[1:] for lp in step.values()]
    assert all(math.isfinite(lp) for lp in logprobs) and len(out.outputs[0].token_ids) == 6
    return seen


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_random_awq_model_generates_with_o1_activations(moe):
    """Random nibbles and scales give the same output scale as the 16-bit random weights, layer after layer."""
    names = ["layers.0.linear_attn.out_proj", "layers.3.self_attn.o_proj", "layers.0.mlp", "layers.3.mlp"]
    q, ref = _output_scales(random_llm(moe, "awq"), names), _output_scales(random_llm(moe, None), names)
    for n in names:
        assert 1 / 3 < q[n] / ref[n] < 3, (n, q[n], ref[n])


def test_random_scales_are_fp16_exact_and_run_the_int4_kernel():
    """use_int4_kernels narrows the random scales to fp16 (as for real AWQ checkpoints: half the bytes streamed),
    and the Triton int4 GEMM (interpreter here) reads the random tensors like the reference."""
    from deltaserve.kernels.int4_gemm import int4_gemm_triton

    model = random_llm(False, "awq").model
    use_int4_kernels(model)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.scales.dtype == torch.float16 for m in linears)
    o = model.get_submodule("layers.3.self_attn.o_proj")
    # fp16: the Triton 3.9 interpreter's tl.dot is wrong for bf16 operands (a CPU emulation issue; the GPU tests
    # cover bf16)
    x = torch.randn(3, o.in_features, generator=torch.Generator().manual_seed(0)).half()
    ref = torch.nn.functional.linear(x.float(), o.dequant(torch.float32))
    out = int4_gemm_triton(x, o.qweight, o.qzeros, o.scales, o.group_size, kpack=o.kpack).float()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


# ---- the decode bound's bytes ----

def hand_count(cfg: ModelConfig, group: int, w: int, s: int, batch: int) -> int:
    """Bytes a decode step reads, counted from the config: 16-bit tensors at w bytes, A_log/dt_bias fp32, int4
    Linears as packed weights (in x out / 2) + int32 zeros (in/G x out/8) + scales (in/G x out, s bytes each);
    experts: the expected number a batch of independent tokens routes to, E (1 - (1 - k/E)^batch); the embedding
    table (a gather) not at all."""
    h, q = cfg.hidden_size, cfg.quantization is not None

    def linear(i, o, int4=q):
        return i * o // 2 + (i // group) * (o // 8) * 4 + (i // group) * o * s if int4 else i * o * w

    hv, v = cfg.linear_num_value_heads, cfg.linear_value_head_dim
    gdn = (linear(h, cfg.conv_dim + hv * v + 2 * hv, int4=False) + cfg.conv_dim * cfg.linear_conv_kernel_dim * w
           + 2 * hv * 4 + v * w + linear(hv * v, h))
    nh, d = cfg.num_attention_heads, cfg.head_dim
    attn = linear(h, (2 * nh + 2 * cfg.num_key_value_heads) * d, int4=False) + 2 * d * w + linear(nh * d, h)
    if cfg.is_moe:
        si, mi = cfg.shared_expert_intermediate_size, cfg.moe_intermediate_size
        touched = cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** batch)
        experts = touched * (2 * linear(h, mi) + linear(mi, h))
        mlp = (linear(h, cfg.num_experts, int4=False) + linear(h, 1, int4=False) + 2 * linear(h, si)
               + linear(si, h) + experts)
    else:
        mlp = 2 * linear(h, cfg.intermediate_size) + linear(cfg.intermediate_size, h)
    layers = sum(gdn if t == "linear_attention" else attn for t in cfg.layer_types)
    return layers + cfg.num_hidden_layers * (mlp + 2 * h * w) + h * w + cfg.vocab_size * h * w


@dataclasses.dataclass
class _Bare:  # what weight_bytes_per_token_step reads of an LLM
    model: nn.Module
    config: ModelConfig


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("quantization", [None, "awq"], ids=["16bit", "awq"])
@pytest.mark.parametrize("batch", [1, 3, 8], ids=["b1", "b3", "b8"])
def test_decode_bytes_equal_a_hand_count(moe, quantization, batch):
    """fp32 on CPU: 16-bit tensors and scales 4 bytes. MoE: 8 experts top-2, so batch 8 touches all of them."""
    llm = random_llm(moe, quantization)
    assert weight_bytes_per_token_step(llm, batch) == pytest.approx(hand_count(llm.config, GROUP, 4, 4, batch),
                                                                      rel=1e-12)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_prefill_counts_the_same_weights_multiplied_in_int4(moe):
    """An int4 qweight int32 holds 8 weights and its scales/zeros none: per token, the int4 model multiplies
    exactly as many weights as the 16-bit one (the prefill FLOPs bound)."""
    q, ref = random_llm(moe, "awq"), random_llm(moe, None)
    assert active_weights(q.model, q.config, 1)[1] == active_weights(ref.model, ref.config, 1)[1]


# ---- the command line, end to end ----

_TINY = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
         "linear_num_key_heads": 2, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
         "linear_num_value_heads": 4}
TINY_PRESETS = {
    "tiny-dense": ("Qwen3_5ForCausalLM", {**_TINY, "intermediate_size": 256}),
    "tiny-moe": ("Qwen3_5MoeForCausalLM", {**_TINY, "num_experts": 8, "num_experts_per_tok": 2,
                                           "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64}),
}
BENCH_ARGS = ["--device", "cpu", "--prompt-lens", "16", "--batch-sizes", "1,2", "--context", "16", "--steps", "2",
              "--num-kv-blocks", "32"]


@pytest.fixture
def tiny_presets(monkeypatch):
    for name, preset in TINY_PRESETS.items():
        monkeypatch.setitem(bench.PRESETS, name, preset)
    monkeypatch.setattr(bench, "V", VOCAB)


@pytest.mark.parametrize("preset", list(TINY_PRESETS))
def test_bench_cli_runs_a_quantized_preset(preset, tiny_presets, capsys):
    assert cli.main(["bench", "--preset", preset, "--quantization", "awq", "--group-size", "32", *BENCH_ARGS]) == 0
    out = capsys.readouterr().out
    assert f"{preset} | awq int4 g32 (mixed) | cpu" in out.splitlines()[0]
    rows = [line.split() for line in out.splitlines() if line.startswith(("prefill", "decode"))]
    assert [r[:2] for r in rows] == [["prefill", "16"], ["decode", "1"], ["decode", "2"]]
    assert all(float(r[3]) > 0 for r in rows)  # tok/s
    assert all(r[4:6] == ["n/a", "n/a"] for r in rows)  # no bound measured on the CPU (it printed nan)
    assert [len(r) for r in rows] == [6, 7, 7] and all(float(r[6]) > 0 for r in rows[1:])  # decode rows: p99 ms


def test_bench_decode_rows_hold_the_whole_batch_under_a_chunked_prefill(tiny_presets, capsys):
    """With a token budget below batch x context, the first rows decode while the rest are prefilled: they reached
    max_tokens during the timed steps, so a valid run was refused as "only 6 sequences fit in the KV cache" (and,
    before that check, timed a smaller batch than its row said)."""
    argv = ["bench", *BENCH_ARGS, "--preset", "tiny-dense", "--batch-sizes", "8", "--context", "64",
            "--num-kv-blocks", "256", "--max-num-batched-tokens", "64"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("decode")]
    assert [r[:2] for r in rows] == [["decode", "8"]]
    # ms, tok/s, bound (n/a on CPU), p99 ms: no step is faster than the mean of all of them
    assert len(rows[0]) == 7 and float(rows[0][6]) >= float(rows[0][2]) * 0.5, out


def test_percentile_is_nearest_rank():
    from deltaserve.bench import percentile

    assert percentile([3.0, 1.0, 2.0], 99) == 3.0 and percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(1, 401)), 99) == 396 and percentile([5.0], 99) == 5.0


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "tiny-dense", "--quantization", "gptq"], "quantization='gptq' is not supported for random weights"),
    (["--preset", "tiny-moe", "--quantization", "awq"], "group_size 128 does not divide its in_features 64"),
    (["--quantization", "awq"], "--quantization applies to --preset"),
    # flags bench dropped without a word, and sizes whose timed steps ran fewer sequences than the row says
    (["--layers", "2"], "--layers applies to --preset"),
    (["--preset", "tiny-dense", "--group-size", "32"], "--group-size applies with --quantization"),
    (["--preset", "tiny-dense", "--max-num-seqs", "1"], "--max-num-seqs 1 is below the largest batch (2)"),
    (["--preset", "tiny-dense", "--max-model-len", "20"], "--max-model-len 20 is below the 43 tokens a run needs"),
    (["--preset", "tiny-dense", "--num-kv-blocks", "3"], "decode at batch 2: only 1 sequences fit in the KV cache"),
    (["--preset", "tiny-dense", "--enable-prefix-caching"], "bench times prefill and decode without the prefix cache"),
], ids=["bad_method", "bad_group", "no_preset", "layers_without_preset", "group_without_quantization",
        "max_num_seqs_below_batch", "max_model_len_too_short", "kv_cache_too_small", "prefix_caching"])
def test_bench_cli_user_errors_are_one_line(argv, needle, tiny_presets, capsys):
    assert cli.main(["bench", *BENCH_ARGS, *argv]) == 2  # argv last: its flags win
    *bars, err = capsys.readouterr().err.strip().splitlines()  # a run that fails part-way leaves its progress bar
    assert err.startswith("error: ") and needle in err and all(b.startswith("bench:") for b in bars), bars


def test_bench_help_leaves_out_the_flags_it_refuses(capsys):
    """bench --help listed --enable-prefix-caching and --prefix-cache-slots, which bench then refused."""
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "--enable-prefix-caching" not in out and "--prefix-cache-slots" not in out and "--max-model-len" in out


@pytest.mark.gpu
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_random_awq_model_on_cuda(moe):
    """The random int4 model on the GPU: fp16 scales, the Triton int4 paths inside CUDA graphs, finite output."""
    llm = LLM.from_config(tiny(moe), device="cuda", dtype="bfloat16", quantization="awq", group_size=GROUP,
                          max_num_seqs=4, num_kv_blocks=64, max_model_len=256)
    assert llm.runner.graphs
    assert all(m.scales.dtype == torch.float16 for m in llm.model.modules() if isinstance(m, QuantLinear))
    outs = llm.generate([{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 40, 90)],
                        SamplingParams(max_tokens=16, temperature=0, prompt_logprobs=0, ignore_eos=True),
                        use_tqdm=False)
    for out in outs:
        assert len(out.outputs[0].token_ids) == 16
        assert all(math.isfinite(lp) for step in out.prompt_logprobs[1:] for lp in step.values())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_prefill_flops_count_the_lm_head_once_per_prompt_and_the_gdn_recurrence(tied):
    """9B shapes (meta device). A prefill computes logits for its last row only: the lm_head's V x H multiplies once
    per prompt, every other weight once per token (counting it per token overstated the FLOPs by 14%). And the GDN
    layers' own state products, 24 layers x 32 value heads x 3 products of 2 x 128 x 128 a token (75.5 MFLOP), were
    left out."""
    cfg = dataclasses.replace(preset_config("qwen3.5-9b"), tie_word_embeddings=tied)
    model = build_model(cfg, torch.device("meta"), torch.bfloat16)
    head = cfg.vocab_size * cfg.hidden_size
    per_token = active_weights(model, cfg, 1)[1] - head
    n, attn = 8192, len(cfg.full_attention_layers) * 2 * cfg.num_attention_heads * cfg.head_dim * 8192 ** 2
    gdn = 24 * 32 * 6 * 128 * 128 * n
    assert bench.prefill_flops(cfg, _Bare(model, cfg), n) == 2 * per_token * n + 2 * head + attn + gdn


@pytest.mark.parametrize("batch, distinct", [(1, 8), (16, 101.96), (64, 222.44)])
def test_moe_decode_bytes_count_the_experts_a_batch_is_expected_to_touch(batch, distinct):
    """35B-A3B shapes (meta device): B tokens each routed to 8 of 256 experts touch 256 (1 - (1 - 8/256)^B) distinct
    experts in expectation: ~102 at batch 16 and ~222.4 at 64, not min(256, 8B) (128 and all 256)."""
    cfg = preset_config("qwen3.5-35b-a3b", 4)
    model = build_model(cfg, torch.device("meta"), torch.bfloat16)
    per_expert = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if n.startswith("layers.0.mlp.experts.")) / cfg.num_experts

    def routed(b):
        return weight_bytes_per_token_step(_Bare(model, cfg), b) - weight_bytes_per_token_step(_Bare(model, cfg), 0)

    assert routed(batch) / (cfg.num_hidden_layers * per_expert) == pytest.approx(distinct, abs=0.01)


def test_decode_bytes_under_tp_count_one_rank_of_kv_and_state():
    """TP=2 at 27B shapes (meta device): rank 0 holds half the weights, half the KV heads (2 of 4) and half the
    GDN value heads (24 of 48), so its step moves half the KV and state bytes; the full model's were counted."""
    from types import SimpleNamespace

    from deltaserve.worker.distributed import TPGroup, shard_config
    from deltaserve.worker.model_runner import kv_bytes_per_block, state_bytes_per_slot

    cfg = preset_config("qwen3.5-27b", 8)
    local = shard_config(cfg, 2)
    model = build_model(cfg, torch.device("meta"), torch.bfloat16, TPGroup(0, 2))
    rec = [torch.empty(0, dtype=torch.float32)]
    llm = SimpleNamespace(model=model, config=cfg, dtype=torch.bfloat16, kv_cache_dtype="auto",
                          runner=SimpleNamespace(cfg=local, caches=SimpleNamespace(recurrent=rec)))
    seq = 1024 * kv_bytes_per_block(local, 1, torch.bfloat16) + 2 * state_bytes_per_slot(local, torch.bfloat16,
                                                                                          torch.float32)
    assert bench.decode_step_bytes(llm, 16, 1024) == weight_bytes_per_token_step(llm, 16) + 16 * seq
