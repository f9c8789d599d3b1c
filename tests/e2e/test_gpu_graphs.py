"""GPU: the captured pieces of prefill and mixed steps (worker/cuda_graph.py::PiecewiseGraphRunner) against the same
engine run eagerly (enforce_eager), on the embedded tiny checkpoints in bf16. The bucket padding changes GEMM shapes
(M = 16 for a 5-token step), which may round differently: tokens must agree until a near-tie, logprobs within 0.05
nats. Measured on an H200: no difference at all, dense and MoE (the MoE moved by up to 0.80 nats while its bf16
expert sums were atomic adds in no fixed order, which this chaotic random model amplified; they are a fixed-order
fp32 sum now). The CPU tests (tests/unit/test_piecewise_graphs.py) check the wiring exactly, with the graphs replaced
by the calls they record. Last, an LLM dropped while a reference cycle holds it: the next LLM's capture and memory."""
import gc
import random

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.tiny import make_tiny

pytestmark = pytest.mark.gpu

NEAR_TIE = 0.05  # nats between the top two
# buckets 16 .. 512; the 700-token prompt's first step is past them (eager: the step budget is 1 024); 1-token prompts
LENGTHS = (5, 16, 17, 40, 130, 300, 511, 700, 1, 64)


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def tiny(tmp_path_factory, request) -> str:
    kind = "moe" if request.param else "dense"
    return make_tiny(str(tmp_path_factory.mktemp(f"gpu_graphs_{kind}") / "tiny"), moe=request.param)


def run(path: str, enforce_eager: bool, prompts, params):
    llm = LLM(path, device="cuda", dtype="bfloat16", max_model_len=1024, max_num_seqs=4,
              max_num_batched_tokens=1024, enforce_eager=enforce_eager, enable_prefix_caching=False)
    sizes = []
    if not enforce_eager:
        pieces = llm.runner.piecewise
        assert pieces is not None and pieces.graphs, "no piecewise graphs were captured"
        run_pieces = pieces.run
        pieces.run = lambda batch: (sizes.append(batch.num_tokens), run_pieces(batch))[1]
    out = llm.generate(prompts, params, use_tqdm=False)
    del llm
    torch.cuda.empty_cache()
    return out, sizes


def test_piecewise_graphs_match_eager(tiny):
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(500) for _ in range(n)]} for n in LENGTHS]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=0)
    ref, _ = run(tiny, True, prompts, params)
    out, sizes = run(tiny, False, prompts, params)
    # steps of up to 512 tokens ran from the graphs (the first step, 78 tokens, is one); the larger ones eagerly
    assert len(sizes) >= 2 and max(sizes) <= 512, sizes
    diffs = []
    for i, (r, o) in enumerate(zip(ref, out)):
        for pr, po in zip(r.prompt_logprobs[1:], o.prompt_logprobs[1:]):
            (tok, lp), = pr.items()
            diffs.append(abs(po[tok].logprob - lp.logprob))
        for j, (a, b) in enumerate(zip(r.outputs[0].token_ids, o.outputs[0].token_ids)):
            top = sorted((v.logprob for v in r.outputs[0].logprobs[j].values()), reverse=True)
            if a != b:
                assert top[0] - top[1] < NEAR_TIE, f"prompt {i} token {j}: {b} != {a}, a gap of {top[0] - top[1]}"
                break
            diffs.append(abs(o.outputs[0].logprobs[j][a].logprob - r.outputs[0].logprobs[j][a].logprob))
    mean, worst = sum(diffs) / len(diffs), max(diffs)
    print(f"logprob difference, graphs against eager: mean {mean:.4f} max {worst:.4f}")
    assert worst < 0.05, f"largest logprob difference {worst}"


def test_capture_after_an_llm_a_cycle_kept(tiny, monkeypatch):
    """An LLM dropped while a reference cycle holds it is destroyed when the garbage collector next runs. Run during
    another LLM's graph capture, its graphs' reset invalidated that capture ("operation failed due to a previous
    error during capture": the test above failed so on the MoE checkpoint, its hook on the runner being such a
    cycle). Here a collection runs right after every capture begins: the old LLM must be gone before."""
    def llm():
        return LLM(tiny, device="cuda", dtype="bfloat16", max_model_len=512, max_num_seqs=4,
                   max_num_batched_tokens=512, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = [{"prompt_token_ids": [3, 1, 4, 1, 5]}]
    old = llm()
    ref = old.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    old.cycle = old
    del old
    begin = torch.cuda.CUDAGraph.capture_begin

    def begin_then_collect(self, *args, **kwargs):
        begin(self, *args, **kwargs)
        gc.collect()
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", begin_then_collect)
    new = llm()
    assert new.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == ref


def test_memory_given_back_by_an_llm_a_cycle_kept(tiny):
    """An LLM holding 60% of the card in its KV cache, dropped while a reference cycle holds it, then another of the
    same size: the first one's memory must be given back before the second allocates (else it runs out)."""
    from deltaserve.worker.model_runner import kv_bytes_per_block

    def llm(**kw):
        return LLM(tiny, device="cuda", dtype="bfloat16", max_model_len=1024, max_num_seqs=4, enforce_eager=True,
                   enable_prefix_caching=False, **kw)
    probe = llm()
    per_block = kv_bytes_per_block(probe.runner.cfg, probe.runner.block_size, torch.bfloat16, "auto")
    del probe
    blocks = int(0.6 * torch.cuda.mem_get_info()[1] / per_block)
    old = llm(num_kv_blocks=blocks)
    old.cycle = old
    del old
    assert llm(num_kv_blocks=blocks).runner.num_kv_blocks == blocks
