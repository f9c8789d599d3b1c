"""GPU: the captured pieces of prefill and mixed steps (worker/cuda_graph.py::PiecewiseGraphRunner) against the same
engine run eagerly (enforce_eager), on the embedded tiny checkpoints in bf16. The bucket padding changes GEMM shapes
(M = 16 for a 5-token step), which may round differently. The dense model measured no difference at all on an H200
(bound: 0.05 nats, and equal tokens until a near-tie). The tiny random MoE is chaotic: its bf16 expert sums are atomic
adds in no fixed order (two eager runs differ), and the padded rows change the experts' grouped-GEMM row counts, so
one rounding grows to ~0.5-0.8 nats within a few layers (0.80 and 0.54 measured, sharpening the routers x20 did not
help); it is held to the bounds test_fp8.py uses for such noise (mean < 0.3, max < 1.5 nats), which a piece reading
the wrong buffer or a padded row writing a real KV slot would break by whole nats. The CPU tests
(tests/unit/test_piecewise_graphs.py) check the wiring exactly, with the graphs replaced by the calls they record."""
import random

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.tiny import make_tiny

pytestmark = pytest.mark.gpu

NEAR_TIE = 0.05  # nats between the top two
LENGTHS = (5, 16, 17, 40, 130, 300, 511, 700, 1, 64)  # buckets 16 .. 512, one step past them (eager), 1-token prompts


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def tiny(tmp_path_factory, request) -> str:
    kind = "moe" if request.param else "dense"
    return make_tiny(str(tmp_path_factory.mktemp(f"gpu_graphs_{kind}") / "tiny"), moe=request.param)


def run(path: str, enforce_eager: bool, prompts, params):
    llm = LLM(path, device="cuda", dtype="bfloat16", max_model_len=1024, max_num_seqs=4,
              max_num_batched_tokens=512, enforce_eager=enforce_eager, enable_prefix_caching=False)
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
    assert len(sizes) >= 5 and max(sizes) <= 512, sizes  # prefill and mixed steps ran from the graphs
    diffs, moe = [], "moe" in tiny
    for i, (r, o) in enumerate(zip(ref, out)):
        for pr, po in zip(r.prompt_logprobs[1:], o.prompt_logprobs[1:]):
            (tok, lp), = pr.items()
            diffs.append(abs(po[tok].logprob - lp.logprob))
        if moe:
            continue
        for j, (a, b) in enumerate(zip(r.outputs[0].token_ids, o.outputs[0].token_ids)):
            top = sorted((v.logprob for v in r.outputs[0].logprobs[j].values()), reverse=True)
            if a != b:
                assert top[0] - top[1] < NEAR_TIE, f"prompt {i} token {j}: {b} != {a}, a gap of {top[0] - top[1]}"
                break
            diffs.append(abs(o.outputs[0].logprobs[j][a].logprob - r.outputs[0].logprobs[j][a].logprob))
    mean, worst = sum(diffs) / len(diffs), max(diffs)
    print(f"logprob difference, graphs against eager: mean {mean:.4f} max {worst:.4f}")
    if moe:
        assert mean < 0.3 and worst < 1.5, (mean, worst)
    else:
        assert worst < 0.05, f"largest logprob difference {worst}"
