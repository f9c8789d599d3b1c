"""Tensor parallelism on CPU (gloo, float32): sharding arithmetic, per-rank loading, TP=2 == TP=1 on dense, MoE and
kv-heads-fewer-than-ranks checkpoints, the up-front divisibility error, and worker shutdown (no orphans).

TP changes only the order of fp32 sums (partial sums + all-reduce), so prompt logprobs agree to LOGPROB_ATOL (1e-4)
and greedy tokens are identical; a wrongly sliced head, conv channel or expert column moves them by >1e-2.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from engine_helpers import assert_close_logprobs, assert_same_completion
from test_weights import pack_experts, shard as split_into_two_files, variant

from deltaserve import LLM, SamplingParams
from deltaserve.config import ModelConfig
from deltaserve.layers.embedding import VocabParallelEmbedding
from deltaserve.models.weights import build_model, load_weights
from deltaserve.tiny import make_tiny
from deltaserve.worker.distributed import (
    TPGroup, check_tp_size, kv_head_range, segments, shard, shard_config, split_range, valid_tp_sizes, vocab_range,
    worker_pids_alive,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """dense / moe: the tiny checkpoints (Hk=2, HV=4, 4 q heads, 2 kv heads); kv1: one KV head, so at TP=2 both
    ranks hold a copy of it; wide: 8 q heads, 2 kv heads, Hk=4, HV=8, so at TP=4 ranks 0-1 hold kv head 0 and
    ranks 2-3 kv head 1."""
    root = tmp_path_factory.mktemp("tp")
    dense = make_tiny(str(root / "dense"))
    return {"dense": dense, "moe": make_tiny(str(root / "moe"), moe=True), "tied-odd-vocab": variant(
                dense, root / "tied", _tie_and_drop_last_token, lambda raw: _tie_config(raw)),
            "kv1": make_tiny(str(root / "kv1"), text_overrides={"num_key_value_heads": 1}),
            "wide": make_tiny(str(root / "wide"), text_overrides={"num_attention_heads": 8, "linear_num_key_heads": 4,
                                                                  "linear_num_value_heads": 8})}


def _tie_and_drop_last_token(sd: dict) -> None:
    """Tied embeddings and an odd vocab (uneven vocab-parallel shards); the tiny tokenizer never emits the last
    (padding) row."""
    del sd["lm_head.weight"]
    name = "model.language_model.embed_tokens.weight"
    sd[name] = sd[name][:-1].contiguous()


def _tie_config(raw: dict) -> None:
    raw["tie_word_embeddings"] = raw["text_config"]["tie_word_embeddings"] = True
    raw["text_config"]["vocab_size"] -= 1


# ---------------------------------------------------------------- pure arithmetic

def test_sharding_arithmetic():
    assert [split_range(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert segments([4, 4, 8], 1, 2) == [(2, 4), (6, 8), (12, 16)]  # GDN [q | k | v]: rank 1's part of each
    assert [kv_head_range(4, r, 2) for r in range(2)] == [(0, 2), (2, 4)]
    assert [kv_head_range(2, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # replicated
    assert [vocab_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    t = torch.arange(12).view(3, 4)
    assert torch.equal(shard(t, 1, 1, 2), t[:, 2:])


class _SummingGroup(TPGroup):
    """A rank whose all-reduce is left to the test (it sums the ranks' partial outputs itself)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("vocab, world", [(10, 4), (12, 2), (7, 3)], ids=["uneven-4", "even-2", "uneven-3"])
def test_vocab_parallel_embedding_partials_sum_to_the_lookup(vocab, world):
    table = torch.randn(vocab, 6)
    ids = torch.tensor([0, vocab - 1, 3, 3, vocab // 2, 1])
    total = torch.zeros(len(ids), 6)
    for rank in range(world):
        emb = VocabParallelEmbedding(vocab, 6, _SummingGroup(rank, world))
        emb.weight.data.copy_(table[emb.start: emb.stop])
        total += emb(ids)
    assert torch.equal(total, table[ids])  # each id from exactly one rank, zeros from the others


def test_shard_config_holds_each_ranks_heads(ckpts):
    local = shard_config(ModelConfig.from_hf_dir(ckpts["moe"]), 2)
    assert (local.num_attention_heads, local.num_key_value_heads, local.linear_num_key_heads,
            local.linear_num_value_heads, local.moe_intermediate_size, local.shared_expert_intermediate_size,
            local.num_experts) == (2, 1, 1, 2, 32, 32, 8)
    assert shard_config(ModelConfig.from_hf_dir(ckpts["kv1"]), 2).num_key_value_heads == 1


@pytest.mark.parametrize("name, world, message", [
    ("dense", 4, "tensor_parallel_size=4 does not divide linear_num_key_heads=2; valid sizes: 1, 2"),
    ("dense", 3, "tensor_parallel_size=3 does not divide num_attention_heads=4; valid sizes: 1, 2"),
    ("kv1", 4, "tensor_parallel_size=4 does not divide linear_num_key_heads=2; valid sizes: 1, 2"),
    ("dense", 0, "tensor_parallel_size must be a positive integer, got 0"),
], ids=["tp4-gdn-heads", "tp3-attention-heads", "tp4-kv1", "tp0"])
def test_divisibility_error_names_field_and_valid_sizes(ckpts, name, world, message):
    with pytest.raises(ValueError) as e:
        check_tp_size(ModelConfig.from_hf_dir(ckpts[name]), world, CPU)
    assert str(e.value) == message


def test_tp4_fails_before_any_process_starts(ckpts):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"^tensor_parallel_size=4 does not divide linear_num_key_heads=2; "
                                         r"valid sizes: 1, 2$"):
        LLM(ckpts["dense"], device="cpu", dtype="float32", tensor_parallel_size=4)
    assert multiprocessing.active_children() == [] and time.monotonic() - t0 < 2


def test_valid_sizes_include_kv_replication(ckpts):
    cfg = ModelConfig.from_hf_dir(ckpts["kv1"])
    assert valid_tp_sizes(cfg) == [1, 2]  # 2 > num_key_value_heads=1: the KV head is replicated


# ---------------------------------------------------------------- per-rank loading (no processes)

@pytest.mark.parametrize("name", ["dense", "moe", "kv1"])
def test_each_rank_loads_exactly_its_slices(ckpts, name):
    """Rank r of 2, loaded alone from the checkpoint, equals the full model's parameters cut by hand."""
    cfg = ModelConfig.from_hf_dir(ckpts[name])
    full = dict(load_shard(cfg, ckpts[name], 0, 1).named_parameters())
    hk_k, hv_v, hv = 2 * 32, 4 * 32, 4  # tiny: Hk=2, HV=4, K=V=32
    for rank in range(2):
        part = dict(load_shard(cfg, ckpts[name], rank, 2).named_parameters())
        q, k, v = (slice(rank * 32, rank * 32 + 32), slice(hk_k + rank * 32, hk_k + rank * 32 + 32),
                   slice(2 * hk_k + rank * 64, 2 * hk_k + rank * 64 + 64))
        conv = torch.cat([full["layers.0.linear_attn.conv1d.weight"][s] for s in (q, k, v)])
        assert torch.equal(part["layers.0.linear_attn.conv1d.weight"], conv)
        in_proj = full["layers.0.linear_attn.in_proj.weight"]
        z0, b0 = 2 * hk_k + hv_v, 2 * hk_k + 2 * hv_v
        want = torch.cat([in_proj[q], in_proj[k], in_proj[v], in_proj[z0 + rank * 64: z0 + rank * 64 + 64],
                          in_proj[b0 + rank * 2: b0 + rank * 2 + 2], in_proj[b0 + hv + rank * 2: b0 + hv + rank * 2 + 2]])
        assert torch.equal(part["layers.0.linear_attn.in_proj.weight"], want)
        assert torch.equal(part["layers.0.linear_attn.A_log"], full["layers.0.linear_attn.A_log"][rank * 2: rank * 2 + 2])
        assert torch.equal(part["layers.0.linear_attn.out_proj.weight"],
                           full["layers.0.linear_attn.out_proj.weight"][:, rank * 64: rank * 64 + 64])
        assert torch.equal(part["layers.3.self_attn.o_proj.weight"],
                           full["layers.3.self_attn.o_proj.weight"][:, rank * 128: rank * 128 + 128])
        vocab = cfg.vocab_size // 2
        assert torch.equal(part["lm_head.weight"], full["lm_head.weight"][rank * vocab: (rank + 1) * vocab])
        assert torch.equal(part["embed_tokens.weight"], full["embed_tokens.weight"][rank * vocab: (rank + 1) * vocab])
        if name == "moe":
            gu = full["layers.0.mlp.experts.gate_up_proj"]
            want = torch.cat([gu[:, rank * 32: rank * 32 + 32], gu[:, 64 + rank * 32: 64 + rank * 32 + 32]], 1)
            assert torch.equal(part["layers.0.mlp.experts.gate_up_proj"], want)
            assert torch.equal(part["layers.0.mlp.gate.weight"], full["layers.0.mlp.gate.weight"])  # router


def test_packed_and_split_checkpoints_give_the_same_shards(ckpts, tmp_path):
    """Packed experts ([E, 2I, H] / [E, H, I]) in a two-file checkpoint: each rank reads the same rows as from
    per-expert tensors in one file."""
    packed = variant(ckpts["moe"], tmp_path / "packed", pack_experts)
    split_into_two_files(packed)
    cfg = ModelConfig.from_hf_dir(packed)
    for rank in range(2):
        a = dict(load_shard(cfg, ckpts["moe"], rank, 2).named_parameters())
        b = dict(load_shard(cfg, packed, rank, 2).named_parameters())
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_replicated_kv_heads_follow_their_query_heads(ckpts):
    """TP=4 over 2 KV heads: rank r's k/v rows are those of KV head r // 2 (its query heads 2r, 2r+1 use it)."""
    cfg = ModelConfig.from_hf_dir(ckpts["wide"])
    full = dict(load_shard(cfg, ckpts["wide"], 0, 1).named_parameters())["layers.3.self_attn.qkv_proj.weight"]
    q_rows, d = 2 * 8 * 64, 64
    for rank in range(4):
        part = dict(load_shard(cfg, ckpts["wide"], rank, 4).named_parameters())["layers.3.self_attn.qkv_proj.weight"]
        h = rank // 2
        assert torch.equal(part[:2 * 2 * d], full[rank * 2 * 2 * d: (rank + 1) * 2 * 2 * d])  # q heads 2r, 2r+1
        assert torch.equal(part[2 * 2 * d: 2 * 2 * d + d], full[q_rows + h * d: q_rows + (h + 1) * d])  # k
        assert torch.equal(part[2 * 2 * d + d:], full[q_rows + 2 * d + h * d: q_rows + 2 * d + (h + 1) * d])  # v


def load_shard(cfg: ModelConfig, path: str, rank: int, world: int, formats: dict | None = None) -> torch.nn.Module:
    """Rank `rank` of `world`'s model shard loaded alone (no processes); formats: a quantized checkpoint's."""
    model = build_model(cfg, CPU, torch.float32, TPGroup(rank, world), formats)
    load_weights(model, cfg, path, rank=rank, world=world)
    return model


# ---------------------------------------------------------------- TP=2 == TP=1 (spawned gloo workers)

PROMPTS = [{"prompt_token_ids": [5, 17, 42, 99, 3, 7, 11, 250, 31, 8, 64, 2, 90, 77, 13, 6, 40, 21]},
           {"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [300, 12, 45, 18, 19, 22, 500]}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=2, logprobs=1, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, n=2, seed=7, max_tokens=6, logprobs=0, ignore_eos=True)


def run_prompts(path: str, tp: int, **kw) -> list:
    """Greedy with prompt logprobs, and seeded n=2 sampling (a fork copies state on every rank); a small token
    budget mixes prefill chunks with decodes. kw: more LLM arguments."""
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=128, max_num_batched_tokens=16,
              tensor_parallel_size=tp, **kw)
    try:
        return llm.generate(PROMPTS, [GREEDY, GREEDY, SAMPLED], use_tqdm=False)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("name, tp", [("dense", 2), ("moe", 2), ("kv1", 2), ("wide", 4), ("tied-odd-vocab", 2)],
                         ids=["dense-tp2", "moe-tp2", "kv1-tp2-kv-replicated", "wide-tp4-kv-replicated",
                              "tied-odd-vocab-tp2"])
def test_tp_equals_tp1(ckpts, name, tp):
    assert_same_outputs(name, run_prompts(ckpts[name], 1), run_prompts(ckpts[name], tp))


def assert_same_outputs(name: str, ref: list, out: list) -> None:
    """run_prompts outputs: prompt logprobs within LOGPROB_ATOL, the same tokens (and sampled logprobs)."""
    for i, (r, o) in enumerate(zip(ref, out)):
        assert_close_logprobs(f"{name}[{i}].prompt_logprobs", r.prompt_logprobs, o.prompt_logprobs)
        assert len(o.outputs) == len(r.outputs)
        for j, (rc, oc) in enumerate(zip(r.outputs, o.outputs)):
            assert_same_completion(f"{name}[{i}].{j}", rc, oc)


# ---------------------------------------------------------------- shutdown

def test_workers_stop_on_del(ckpts):
    llm = LLM(ckpts["dense"], device="cpu", dtype="float32", max_model_len=64, tensor_parallel_size=2)
    pids = llm.worker_pids
    assert len(pids) == 1 and worker_pids_alive(pids) == pids
    llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)
    del llm
    gc.collect()
    assert worker_pids_alive(pids) == []
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_workers_stop_when_the_parent_ends(ckpts, ending):
    """A script that never calls shutdown: its workers are gone after a normal exit, and after the parent is
    SIGKILLed (the pipe from rank 0 closes, so a worker waiting for a step exits)."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from deltaserve import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM({ckpts['dense']!r}, device="cpu", dtype="float32", max_model_len=64, tensor_parallel_size=2)
            llm.generate([{{"prompt_token_ids": [1, 2, 3]}}], SamplingParams(max_tokens=2), use_tqdm=False)
            print(" ".join(map(str, llm.worker_pids)), flush=True)
            if {ending!r} == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    pids = [int(p) for p in res.stdout.split()]
    assert pids, res.stderr
    deadline = time.monotonic() + 15
    while worker_pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_pids_alive(pids) == []


def test_a_dead_worker_is_one_clear_error_and_the_llm_says_it_cannot_run(ckpts):
    """A TP worker that dies (OOM killer, a crash): the next step failed on gloo's 'Connection reset by peer' or a
    bare BrokenPipeError, and every later call the same. Now each call names the worker and says to start over."""
    import os
    import signal

    llm = LLM(ckpts["dense"], device="cpu", dtype="float32", max_model_len=64, tensor_parallel_size=2)
    llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)
    (pid,) = llm.worker_pids
    os.kill(pid, signal.SIGKILL)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=rf"cannot run any more: tensor-parallel worker 1 \(pid {pid}\) exited"):
            llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)
    llm.shutdown()
    with pytest.raises(RuntimeError, match=rf"worker 1 \(pid {pid}\) exited"):  # the cause outlives the shutdown
        llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)


@pytest.mark.parametrize("busy", [True, False], ids=["request-in-flight", "idle"])
def test_a_dead_worker_marks_the_server_engine_dead(ckpts, busy):
    """Behind `deltaserve serve --tp 2`: /health stayed 200 after a worker died and every later request failed on a
    broken pipe; on an idle server it stayed 200 until the next request's step failed, so a load balancer kept
    sending requests to a replica that could run none. The request in flight now fails naming the worker, and the
    engine reports itself dead as soon as the watchdog sees the exit (/health 503, new requests refused)."""
    import asyncio
    import os
    import signal

    from deltaserve.serve.async_engine import AsyncEngine, EngineError

    llm = LLM(ckpts["dense"], device="cpu", dtype="float32", max_model_len=64, tensor_parallel_size=2)
    (pid,) = llm.worker_pids

    async def main():
        eng = AsyncEngine(llm)
        eng.start()
        try:
            if busy:
                stream = await eng.add_request([5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True), "r")
                await stream.__anext__()  # running
            os.kill(pid, signal.SIGKILL)
            if busy:
                with pytest.raises(EngineError, match=rf"worker 1 \(pid {pid}\) exited"):
                    async for _ in stream:
                        pass
            await _refuses_as_lost_worker(eng)
        finally:
            eng.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
    llm.shutdown()


async def _refuses_as_lost_worker(eng) -> None:
    """Within 30 s the engine reports itself dead, and a new request is refused naming a lost worker."""
    import asyncio

    from deltaserve.serve.async_engine import EngineStopped

    deadline = time.monotonic() + 30
    while eng.alive and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not eng.alive
    with pytest.raises(EngineStopped, match="a tensor-parallel worker exited"):
        await eng.add_request([5, 6, 7], GREEDY, "again")


def test_a_step_that_finds_the_group_broken_refuses_new_requests_naming_it(ckpts, monkeypatch):
    """The race behind a flaky run of the test above: the step fails on the broken pipe and reads the worker's exit
    (tp_failure) before the watchdog sets tp_lost. The engine is dead at once, and a new request must already be
    refused as a lost worker, not as a shutdown. Here the watchdog never fires (one process, a failure faked)."""
    import asyncio

    from deltaserve.serve.async_engine import AsyncEngine, EngineError

    llm = LLM(ckpts["dense"], device="cpu", dtype="float32", max_model_len=64)
    monkeypatch.setattr(llm, "tp_failure", lambda wait=0.0: "tensor-parallel worker 1 (pid 42) exited")

    def broken_step():
        raise BrokenPipeError("[Errno 32] Broken pipe")

    monkeypatch.setattr(llm.engine, "step", broken_step)

    async def main():
        eng = AsyncEngine(llm)
        eng.start()
        try:
            stream = await eng.add_request([5, 6, 7], GREEDY, "r")
            with pytest.raises(EngineError, match=r"worker 1 \(pid 42\) exited"):
                async for _ in stream:
                    pass
            await _refuses_as_lost_worker(eng)
            assert not llm.tp_lost  # refused from the step's own finding, not the watchdog's
        finally:
            eng.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


# ---------------------------------------------------------------- a step that goes wrong part-way

def _tp2(ckpts) -> LLM:
    return LLM(ckpts["dense"], device="cpu", dtype="float32", max_model_len=64, tensor_parallel_size=2)


def _wait_gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while worker_pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return worker_pids_alive(pids) == []


def test_an_error_part_way_through_a_step_on_rank_0_gives_the_group_up(ckpts, monkeypatch):
    """Rank 0 raising between sending a step and its last collective left the worker inside that step: the next
    step's collectives paired with the stale ones (a gloo size mismatch, or a wait for the 10-minute timeout; under
    NCCL, sums of the wrong tensors). Now the worker is stopped at once and every later call says why."""
    llm = _tp2(ckpts)
    ref = llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)
    pids = llm.worker_pids
    model = llm.runner.model

    def broken(hidden):  # before the vocab gather, which the worker is then waiting in
        raise RuntimeError("injected logits failure")

    monkeypatch.setattr(model, "compute_logits", broken)
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="injected logits failure"):
        llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)
    assert _wait_gone(pids, 1.0), "the worker stuck in the abandoned step was not stopped"
    assert time.monotonic() - t < 15
    monkeypatch.undo()
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"cannot run any more: a step failed part-way on rank 0 \(RuntimeError: "
                                               r"injected logits failure\), leaving the ranks out of step"):
            llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)
    llm.shutdown()
    assert ref[0].outputs[0].token_ids  # the group worked before the failure


def test_ctrl_c_during_a_step_lands_after_it_and_the_llm_goes_on(ckpts, monkeypatch):
    """Ctrl-C inside rank 0's share of a step is held until that share is done, so the ranks stay in step: the call
    ends in KeyboardInterrupt, the worker lives, and the next call gives the same tokens as before. A SIGINT sent to
    the worker (the terminal signals the whole process group) is ignored there: rank 0 decides when workers stop."""
    import signal

    # a run started in the background (CI) inherits SIGINT ignored, and Python then installs no handler for it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    llm = _tp2(ckpts)
    try:
        _interrupt_a_step(llm, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)
        llm.shutdown()


def _interrupt_a_step(llm, monkeypatch) -> None:
    import signal

    ref = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    (pid,) = llm.worker_pids
    os.kill(pid, signal.SIGINT)
    model = llm.runner.model
    original = model.compute_logits
    calls = []

    def interrupted(hidden):
        if not calls:
            signal.raise_signal(signal.SIGINT)
        calls.append(1)
        return original(hidden)

    monkeypatch.setattr(model, "compute_logits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert len(calls) == 1, "the interrupt was not held until the step's end"
    monkeypatch.undo()
    assert worker_pids_alive([pid]) == [pid]
    assert_same_outputs("after-ctrl-c", ref, llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    t = time.monotonic()
    llm.shutdown()
    assert _wait_gone([pid], 5.0) and time.monotonic() - t < 5
    with pytest.raises(RuntimeError, match="workers were shut down"):
        llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)


def test_a_worker_error_in_a_step_is_named_on_rank_0(ckpts, monkeypatch):
    """A step that raises on a worker (its own device's OOM, say): the worker kept its traceback to itself and, after
    leave_group's 10 s, rank 0's collective failed on 'Connection reset by peer'. Now the worker reports the error and
    exits at once, and rank 0's calls name the worker and its error."""
    import dataclasses

    from deltaserve.worker.distributed import TPWorkers

    llm = _tp2(ckpts)
    (pid,) = llm.worker_pids
    workers = llm.runner.peers

    def send_corrupt(plan):  # only the worker gets a slot far past its state pool
        TPWorkers.send(workers, dataclasses.replace(plan, state_slots=[10 ** 6] * len(plan.state_slots)))

    monkeypatch.setattr(workers, "send", send_corrupt)
    t = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"cannot run any more: tensor-parallel worker 1 \(pid {pid}\) failed: "
                                           r"1 slot\(s\) outside \[-1, 64\)"):
        llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)
    assert time.monotonic() - t < 8
    assert _wait_gone([pid], 5.0)
    llm.shutdown()


@pytest.mark.parametrize("how", ["shutdown", "abandon"])
def test_rank_0_releases_its_graphs_before_leaving_the_group(ckpts, monkeypatch, how):
    """NCCL's teardown blocks while collectives sit in a live CUDA graph (pytorch/pytorch#115388): rank 0 destroys its
    decode graphs before it leaves the group, on a shutdown and when a broken group is given up (workers do the same;
    tests/e2e/test_gpu_tp.py checks the whole exit on two GPUs)."""
    from deltaserve.worker import distributed

    llm = _tp2(ckpts)
    events = []
    release = llm.runner.release_graphs
    monkeypatch.setattr(llm._workers, "before_leave", lambda: (events.append("release"), release()))
    leave = distributed.leave_group
    monkeypatch.setattr(distributed, "leave_group", lambda timeout: (events.append("leave"), leave(timeout)))
    if how == "shutdown":
        llm.shutdown()
    else:
        llm._workers.abandon("test")
    assert events == ["release", "leave"]


@pytest.mark.parametrize("ending", ["killed", "shutdown"])
def test_a_worker_exiting_outside_shutdown_aborts_the_group(ckpts, monkeypatch, ending):
    """Under NCCL a worker that died mid-step left rank 0 waiting on that step's all-reduce, which spins on the GPU
    until the 10-minute collective timeout (measured on two H200s). A watchdog now aborts the communicator as soon as
    a worker exits outside shutdown(), and the step's results are refused. (gloo here: the abort is recorded; the GPU
    run is tests/e2e/test_gpu_tp.py.) A shutdown's own exits abort nothing."""
    import os
    import signal

    from deltaserve.llm import EngineDeadError

    llm = _tp2(ckpts)
    workers = llm._workers
    aborted = []
    monkeypatch.setattr(workers, "_abort_group", lambda: aborted.append(True))
    (pid,) = llm.worker_pids
    if ending == "shutdown":
        llm.shutdown()
        assert _wait_gone([pid], 5.0)
        time.sleep(0.3)
        assert not workers.lost.is_set() and aborted == []
        return
    os.kill(pid, signal.SIGKILL)
    assert workers.lost.wait(5.0) and aborted == [True]
    with pytest.raises(RuntimeError, match="exited during the step"):
        workers.check_step()
    with pytest.raises(EngineDeadError, match=rf"tensor-parallel worker 1 \(pid {pid}\) exited"):
        llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)
    llm.shutdown()


def test_a_step_that_lost_a_worker_delivers_no_token(ckpts, monkeypatch):
    """After the abort, rank 0's step finishes with whatever the aborted all-reduces left: its samples must not reach
    the user. Rank 0's share here loses the worker and returns garbage logits, as an aborted NCCL step would."""
    import os
    import signal

    from deltaserve.llm import EngineDeadError

    llm = _tp2(ckpts)
    workers = llm._workers
    monkeypatch.setattr(workers, "_abort_group", lambda: None)
    (pid,) = llm.worker_pids

    def lose_the_worker(plan):
        os.kill(pid, signal.SIGKILL)
        assert workers.lost.wait(5.0)
        return torch.zeros(len(plan.logits_rows), llm.runner.cfg.vocab_size)

    monkeypatch.setattr(llm.runner, "run_plan", lose_the_worker)
    got = []
    with pytest.raises(EngineDeadError, match=rf"tensor-parallel worker 1 \(pid {pid}\) exited"):
        for out in llm.generate_stream([PROMPTS[1]], GREEDY):
            got.append(out)
    assert all(out.outputs[0].token_ids == [] for out in got), got
    llm.shutdown()


def test_a_script_without_the_main_guard_fails_at_once(ckpts, tmp_path):
    """The README's example plus tensor_parallel_size=2, with no `if __name__ == "__main__":`: the spawned worker
    re-imports the script and dies in Python's bootstrap check, and rank 0 waited in the rendezvous for a worker that
    would never come (10 minutes). Each worker now reports before the rendezvous, so rank 0 says what happened."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text("import sys\nfrom deltaserve import LLM\n"
                      "LLM(sys.argv[1], device='cpu', tensor_parallel_size=2, max_model_len=64)\nprint('built')\n")
    t = time.monotonic()
    res = subprocess.run([sys.executable, str(script), ckpts["dense"]], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "built" not in res.stdout
    assert "tensor-parallel worker 1 exited during start-up" in res.stderr and "__main__" in res.stderr, res.stderr
    assert time.monotonic() - t < 60


def test_a_second_tp_llm_in_one_process_says_why_it_cannot_start(ckpts):
    """It was refused as "torch.distributed is already initialised; run deltaserve outside torchrun", though no
    torchrun was involved: the first LLM's own group was."""
    first = _tp2(ckpts)
    try:
        with pytest.raises(ValueError, match=r"another tensor-parallel LLM of this process .* shut it down first"):
            _tp2(ckpts)
        assert first.generate([PROMPTS[1]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    finally:
        first.shutdown()
    _tp2(ckpts).shutdown()  # after the shutdown, a new one starts


def test_a_worker_lost_before_the_rendezvous_is_one_clear_error(ckpts):
    """A worker that dies after reporting 'started' and before joining the process group left rank 0 waiting in the
    rendezvous for COLLECTIVE_TIMEOUT (10 minutes). In a process of its own: the abandoned join stays blocked."""
    code = ("from deltaserve import LLM\n"
            "if __name__ == '__main__':\n"
            f"    LLM({ckpts['dense']!r}, device='cpu', dtype='float32', max_model_len=64, tensor_parallel_size=2)\n")
    env = {**os.environ, "DELTASERVE_TEST_TP_EXIT": "rank1-before-rendezvous", "OMP_NUM_THREADS": "1"}
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0 and time.monotonic() - t < 120
    last = res.stderr.strip().splitlines()[-1]
    assert "tensor-parallel worker 1 exited while joining the process group (exit code 3)" in last, res.stderr[-2000:]
