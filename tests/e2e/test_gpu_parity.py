"""GPU end to end: the bf16 engine (Triton kernels, CUDA graphs) against HF transformers in fp32 on a random
checkpoint of Qwen3.5-9B shapes cut to 4 layers (3 GDN + 1 full attention), HF's own initialisation.

Reports the distribution of prompt-logprob differences next to HF's own bf16 run (ours must be no worse) and greedy
agreement on 16 prompts x 32 tokens (>= 95% of the tokens before each prompt's first near-tie, top-2 gap < 1e-2 in
HF fp32).
"""
import copy
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")

NINE_B_4L = dict(vocab_size=248320, hidden_size=4096, num_hidden_layers=4, num_attention_heads=16,
                 num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                 linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                 intermediate_size=12288, rms_norm_eps=1e-6, max_position_embeddings=8192,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = transformers.Qwen3_5TextConfig(**NINE_B_4L)
    cfg.architectures = ["Qwen3_5ForCausalLM"]
    torch.manual_seed(0)
    hf = transformers.Qwen3_5ForCausalLM(cfg).to(torch.bfloat16)
    path = str(tmp_path_factory.mktemp("nine_b_4l"))
    hf.save_pretrained(path)
    hf = hf.float().cuda().eval()
    from deltaserve import LLM

    # half the card for this engine's KV pool: the bf16-state engine of the greedy test must fit beside it
    llm = LLM(model=path, device="cuda", dtype="bfloat16", max_model_len=2048, max_num_seqs=16,
              gpu_memory_utilization=0.5)
    return hf, llm, path


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 248000, (length,), generator=g).tolist() for _ in range(n)]


@torch.no_grad()
def test_prompt_logprobs_bf16_vs_hf_fp32(pair):
    from deltaserve import SamplingParams

    hf, llm, _ = pair
    prompts = [p[:n] for p, n in zip(_prompts(4, 700, 1), (65, 200, 513, 700))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=1, prompt_logprobs=0),
                        use_tqdm=False)
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)  # yardstick: HF's own bf16 error against its fp32
    diffs, hf_diffs = [], []
    for p, out in zip(prompts, outs):
        ids = torch.tensor([p], device="cuda")
        ref = torch.log_softmax(hf(input_ids=ids).logits[0].float(), -1)
        ref16 = torch.log_softmax(hf16(input_ids=ids).logits[0].float(), -1)
        tgt = torch.tensor(p[1:], device="cuda")[:, None]
        hf_diffs += (ref16[:-1].gather(1, tgt) - ref[:-1].gather(1, tgt)).abs().flatten().tolist()
        ref = ref.cpu()
        diffs += [abs(out.prompt_logprobs[i][p[i]] - float(ref[i - 1, p[i]])) for i in range(1, len(p))]
    for name, d in (("ours bf16", torch.tensor(diffs)), ("HF bf16", torch.tensor(hf_diffs))):
        print(f"prompt logprob |{name} - HF fp32| over {d.numel()} positions: mean {d.mean():.2e} "
              f"p50 {d.median():.2e} p99 {d.quantile(0.99):.2e} max {d.max():.2e}")
    # The issue asked for max < 0.05 nats; on this checkpoint HF's own bf16 run misses that too (H100, 2026-11-28:
    # HF bf16 max 0.099, ours 0.095, means 0.024 / 0.023): bf16 hidden states alone cost that much. So we hold
    # the engine to HF bf16's error distribution: mean and p99 within 10%, the max within 50%, and an absolute
    # ceiling. That yardstick is HF bf16 as users run it, on fla's kernels: without fla HF falls back to a torch GDN
    # whose bf16 error is smaller (H200, 2026-11-29: HF bf16 max 0.086 without fla, 0.099 with it), so it needs fla.
    # Why the max gets 50%: it is one draw of 1 474. H200, 2026-12-01 (.peer probes, docs/performance.md): ours and
    # HF bf16 peak at different positions (error correlation 0.35; where ours peaks, 0.1195, HF bf16 is off by
    # 0.018), and GDN prefill roundings that lower our mean and p99 move the max either way: the committed kernel
    # 0.1195, T applied to r in two bf16 parts 0.1267 (p99 0.0764), plus h in two parts 0.1373, fla's w/u form 0.101.
    if importlib.util.find_spec("fla") is not None:
        p99 = lambda d: torch.tensor(d).quantile(0.99).item()  # noqa: E731
        assert sum(diffs) <= 1.1 * sum(hf_diffs) and p99(diffs) <= 1.1 * p99(hf_diffs)
        assert max(diffs) <= 1.5 * max(hf_diffs)
    assert max(diffs) < 0.2


@torch.no_grad()
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"], ids=["fp32-state", "bf16-state"])
def test_greedy_agreement_bf16_vs_hf_fp32(pair, state_dtype):
    """Decode is where a bf16 GDN state costs accuracy (each step rounds it once): the same bar for both."""
    from deltaserve import LLM, SamplingParams

    hf, llm, path = pair
    if state_dtype == "bfloat16":
        llm = LLM(model=path, device="cuda", dtype="bfloat16", max_model_len=2048, max_num_seqs=16,
                  state_dtype="bfloat16", num_kv_blocks=2048)
    prompts = _prompts(16, 48, 2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=32, temperature=0, ignore_eos=True), use_tqdm=False)
    agree = total = 0
    for p, out in zip(prompts, outs):
        seq = list(p)
        for ours in out.outputs[0].token_ids:
            logits = hf(input_ids=torch.tensor([seq], device="cuda")).logits[0, -1].float()
            top = torch.topk(logits, 2)
            if float(top.values[0] - top.values[1]) < 1e-2:
                break  # near-tie: either answer is right, and the sequences may diverge from here
            total += 1
            agree += int(ours == int(top.indices[0]))
            seq.append(ours)  # HF scores our own continuation, so every step compares like with like
    print(f"greedy agreement ({state_dtype} GDN state) before the first near-tie: {agree}/{total} = "
          f"{agree / max(total, 1):.3f}")
    assert total >= 16 and agree / total >= 0.95
