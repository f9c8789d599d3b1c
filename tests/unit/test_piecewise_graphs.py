"""The piecewise runner of prefill and mixed steps (worker/cuda_graph.py::PiecewiseGraphRunner) on the CPU, with its
graphs swapped for a recorder that replays the captured piece itself: the static buffers, the bucket padding (rows
past the step's tokens run the pieces and must write no KV), the mixers between the replays and the model's split
into pieces and mixers must give what the eager forward gives. The captured graphs themselves run on the GPU
(tests/e2e/test_gpu_graphs.py)."""
import gc
import random

import pytest

from deltaserve.tiny import make_tiny
from deltaserve.worker.cuda_graph import PiecewiseGraphRunner, piece_buckets

from engine_helpers import assert_same_completion, greedy, make_llm, random_prompt


class _Replay:
    def __init__(self, fn):
        self.replay, self.runs = fn, 0

    def reset(self):
        self.replay = None


class EagerPieces(PiecewiseGraphRunner):
    """Records each piece as the call itself; notes the kinds of step it ran."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.kinds = set()

    def _record(self, fn, pool):
        return _Replay(fn)

    def run(self, batch):
        self.kinds.add("mixed" if 1 in batch.query_lens_cpu else "prefill")
        return super().run(batch)


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def tiny(tmp_path_factory, request):
    return make_tiny(str(tmp_path_factory.mktemp("pieces") / "tiny"), moe=request.param)


def test_piece_buckets():
    assert piece_buckets(512) == [16, 32, 64, 128, 256, 512]
    assert piece_buckets(100) == [16, 32, 64, 100]
    assert piece_buckets(16) == [16]


@pytest.mark.parametrize("max_batched", [24, 64], ids=["chunked", "whole"])
def test_pieces_match_the_eager_forward(tiny, max_batched):
    """Prompts of 1..70 tokens, 4 running at a time: prefill-only steps and mixed ones (new prompts beside running
    decodes) of every bucket, with prefill chunked at 24 tokens a step or at 64, against the same LLM settings
    without the runner."""
    kw = dict(max_num_seqs=4, max_num_batched_tokens=max_batched, enable_prefix_caching=False)
    eager, pieced = make_llm(tiny, **kw), make_llm(tiny, **kw)
    runner = pieced.runner
    runner.piecewise = EagerPieces(runner.model, runner.caches, runner.device, max_batched, runner.block_size)
    runner.piecewise.capture()
    rng = random.Random(7)
    vocab = eager.runner.cfg.vocab_size
    prompts = [random_prompt(rng, n, vocab) for n in (5, 17, 33, 70, 9, 48, 2, 1)]
    params = [greedy(6 + i % 5) for i in range(len(prompts))]
    ref = eager.generate(prompts, params, use_tqdm=False)
    out = pieced.generate(prompts, params, use_tqdm=False)
    assert runner.piecewise.kinds == {"mixed", "prefill"}
    for i, (r, o) in enumerate(zip(ref, out)):
        assert_same_completion(f"prompt {i}", r.outputs[0], o.outputs[0])


def test_padded_rows_write_no_kv(tiny):
    """A 5-token step runs the 16-token bucket after a 20-token step: the 11 padded rows (their static token ids
    changed, so whatever they compute differs from what the cache holds) must leave every KV row as it was."""
    llm = make_llm(tiny, max_num_seqs=2, max_num_batched_tokens=32, enable_prefix_caching=False)
    runner = llm.runner
    runner.piecewise = EagerPieces(runner.model, runner.caches, runner.device, 32, runner.block_size)
    runner.piecewise.capture()
    llm.generate([{"prompt_token_ids": list(range(3, 23))}], greedy(1), use_tqdm=False)
    runner.piecewise.input_ids.fill_(1)
    before = [(k.clone(), v.clone()) for k, v in runner.caches.kv]
    llm.generate([{"prompt_token_ids": [3, 4, 5, 6, 7]}], greedy(1), use_tqdm=False)
    for layer, ((k0, v0), (k1, v1)) in enumerate(zip(before, runner.caches.kv)):
        rows = int(((k0 != k1).flatten(2).any(-1) | (v0 != v1).flatten(2).any(-1)).sum())  # [blocks, block size]
        assert 1 <= rows <= 5, f"attention layer {layer}: {rows} KV rows written by a 5-token step"


def test_capture_collects_garbage_first_and_none_during(tiny):
    """Objects a reference cycle kept (an old LLM's graphs, whose reset is illegal mid-capture) are collected before
    the capture, and the collector stays off while the pieces are recorded, on again after."""
    llm = make_llm(tiny, max_num_seqs=2, max_num_batched_tokens=32, enable_prefix_caching=False)
    runner = llm.runner
    collected, seen = [], []

    class Cycle:
        def __del__(self):
            collected.append(True)

    class Watched(EagerPieces):
        def _record(self, fn, pool):
            seen.append((gc.isenabled(), bool(collected)))
            return super()._record(fn, pool)

    assert gc.isenabled()
    cycle = Cycle()
    cycle.me = cycle
    del cycle
    Watched(runner.model, runner.caches, runner.device, 32, runner.block_size).capture()
    assert seen and all(state == (False, True) for state in seen), seen[:3]
    assert gc.isenabled()
