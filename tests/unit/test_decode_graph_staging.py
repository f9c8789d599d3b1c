"""The decode-graph path of ModelRunner on CPU: CudaGraphRunner's buffers, staging and bucket padding, with each
"graph" an eager forward over the bucket's static batch (a CUDA graph replays exactly that forward on the GPU).

It checks what the GPU path does on the host: a decode step's per-row inputs and its padding rows go into the
bucket's buffer in one copy (`stage`), tokens still in flight (async scheduling) land in that buffer, the block
tables follow, and padding rows write no KV or state. Outputs must equal the eager path's (fp32, LOGPROB_ATOL: the
padded bucket changes matmul shapes only). Also: the SamplingBatch a static decode builds once is reused, and one
whose requests change, or that reads penalties, is rebuilt.
"""
from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import assert_same_completion, make_llm, random_prompt

from deltaserve import SamplingParams
from deltaserve.tiny import make_tiny
from deltaserve.worker import model_runner
from deltaserve.worker.cuda_graph import CudaGraphRunner


class EagerGraph:
    """Stands in for bucket b's captured graph: replay = the captured forward, run eagerly on the static inputs."""

    def __init__(self, graphs: CudaGraphRunner, b: int):
        self.graphs, self.b = graphs, b

    def replay(self) -> None:
        g = self.graphs
        batch = g._batch(self.b)
        # the CUDA decode kernel reads the lengths on the device; the CPU reference reads their host copy
        batch.context_lens_cpu = batch.context_lens.tolist()
        g.outputs[self.b].copy_(g.model(batch, g.caches))


def with_eager_graphs(llm, max_num_seqs: int):
    runner = llm.runner
    g = CudaGraphRunner(runner.model, runner.caches, runner.device, max_num_seqs,
                        -(-llm.max_model_len // runner.block_size), llm.max_model_len)
    with torch.inference_mode():
        for b in g.buckets:
            g.outputs[b] = torch.zeros(b, llm.config.hidden_size)
            g.graphs[b] = EagerGraph(g, b)
    runner.graphs = g
    return g


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {kind: make_tiny(str(tmp_path_factory.mktemp(kind)), moe=kind == "moe") for kind in ("dense", "moe")}


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_decode_graph_path_equals_eager(tiny, kind, async_scheduling):
    rng = random.Random(5)
    ref_llm = make_llm(tiny[kind], max_num_seqs=6, async_scheduling=async_scheduling)
    llm = make_llm(tiny[kind], max_num_seqs=6, async_scheduling=async_scheduling)
    g = with_eager_graphs(llm, 6)
    replays = []
    stage = g.stage

    def counted_stage(rows):
        replays.append(len(rows[0]))
        return stage(rows)

    g.stage = counted_stage
    vocab = llm.config.vocab_size
    # 5 requests of different lengths and finishes: decode batches of 5, 4, ... rows pad to buckets 8, 4, 2, 1
    prompts = [random_prompt(rng, n, vocab) for n in (7, 30, 3, 18, 11)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=2, ignore_eos=True) for m in (9, 4, 12, 6, 2)]
    params[2] = SamplingParams(temperature=0.9, seed=3, max_tokens=12, logprobs=1, ignore_eos=True)
    ref = ref_llm.generate(prompts, params, use_tqdm=False)
    out = llm.generate(prompts, params, use_tqdm=False)
    for i, (r, o) in enumerate(zip(ref, out)):
        assert_same_completion(f"request {i}", r.outputs[0], o.outputs[0])
    assert replays and max(replays) == 5 and 1 in replays, f"decode steps on the graph path: {replays}"
    s = llm.engine.scheduler
    assert s.blocks.num_free == s.blocks.num_blocks and s.states.num_free == s.states.num_slots


def test_stage_pads_rows_to_the_bucket(tiny):
    llm = make_llm(tiny["dense"], max_num_seqs=6)
    g = with_eager_graphs(llm, 6)
    ids = g.stage(([5, 6, 7], [10, 11, 12], [40, 41, 42], [0, 1, 2], [11, 12, 13]))
    b = g.bucket(3)
    assert b == 4 and ids.data_ptr() == g.ints[4].data_ptr() and ids.shape == (3,)
    batch = g._batch(b)
    assert batch.input_ids.tolist() == [5, 6, 7, 0] and batch.positions.tolist() == [10, 11, 12, 0]
    assert batch.slot_mapping.tolist() == [40, 41, 42, -1] and batch.state_slots.tolist() == [0, 1, 2, -1]
    assert batch.context_lens.tolist() == [11, 12, 13, 1]
    g.stage(([9], [1], [2], [3], [4]))
    assert g._batch(1).input_ids.tolist() == [9] and g._batch(4).context_lens.tolist() == [11, 12, 13, 1]


def test_sampling_batch_reused_while_static(tiny, monkeypatch):
    llm = make_llm(tiny["dense"], max_num_seqs=4)
    built = []
    from_requests = model_runner.SamplingBatch.from_requests

    def counted(params, *a, **k):
        built.append(len(params))
        return from_requests(params, *a, **k)

    monkeypatch.setattr(model_runner.SamplingBatch, "from_requests", counted)
    prompt = random_prompt(random.Random(1), 9, llm.config.vocab_size)
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate([prompt, prompt], plain, use_tqdm=False)
    assert built == [2], f"a static decode of 2 rows built {built} batches (1 expected)"
    built.clear()
    # the second request finishes first: one batch for 2 rows, one for the row left
    llm.generate([prompt, prompt], [plain, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)],
                 use_tqdm=False)
    assert built == [2, 1], built
    built.clear()
    # penalties read the tokens so far: rebuilt at every step; min_tokens bans EOS until 3 tokens are out: rebuilt
    # while it does (steps 1-3), then kept (step 4) and reused (step 5)
    for p, builds in ((SamplingParams(temperature=0.0, max_tokens=5, repetition_penalty=1.3, ignore_eos=True), 5),
                      (SamplingParams(temperature=0.0, max_tokens=5, min_tokens=3, ignore_eos=True), 4)):
        llm.generate([prompt], p, use_tqdm=False)
        assert len(built) == builds, f"{p}: {built}"
        built.clear()
