"""Programmatic dependent launch (kernels/pdl.py): only launches captured into a CUDA graph carry it, and a captured
chain of PDL kernels computes bit for bit what the same kernels compute launched eagerly (without it)."""
import pytest
import torch

from deltaserve.kernels.pdl import _enabled, pdl_args


def test_no_pdl_off_the_gpu_or_outside_a_capture():
    assert pdl_args(torch.zeros(2)) == {}
    if torch.cuda.is_available():
        assert pdl_args(torch.zeros(2, device="cuda")) == {}  # eager: measured slower on prefill (pdl.py)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4], ids=["t1", "t4"])
def test_captured_moe_block_equals_eager_bit_for_bit(t):
    """35B-A3B shapes, mixed AWQ: residual RMSNorm, then the MoE block (fused router; at t = 1 the two-launch int4
    experts, whose down kernel loads ids and weight rows before the wait; at t = 4 the per-pair GEMVs, split sums and
    combine), eager against a CUDA-graph replay. Every kernel runs the same arithmetic in the same order, so
    the outputs are equal exactly: a kernel reading its predecessor's output before griddepcontrol.wait would not
    be."""
    from deltaserve import LLM
    from deltaserve.bench import preset_config

    cfg = preset_config("qwen3.5-35b-a3b", 1)
    llm = LLM.from_config(cfg, device="cuda", dtype="bfloat16", quantization="awq", max_num_seqs=4, num_kv_blocks=16,
                          max_model_len=64, seed=3, enforce_eager=True)
    layer = llm.model.layers[0]
    norm, moe = layer.post_attention_layernorm, layer.mlp
    g = torch.Generator("cuda").manual_seed(t)
    h, res = (torch.randn(t, cfg.hidden_size, device="cuda", generator=g).bfloat16() for _ in range(2))

    def block():
        y, r = norm(h, res)
        return moe(y) + r

    seen = {}
    with torch.no_grad():
        eager = block()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            seen["pdl"] = pdl_args(h)
            out = block()
        graph.replay()
        torch.cuda.synchronize()
    assert bool(seen["pdl"]) == _enabled(torch.cuda.current_device())  # Hopper+ under a Triton with griddepcontrol
    assert torch.equal(out, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4], ids=["b1", "b4"])
def test_captured_gdn_decode_steps_equal_eager_bit_for_bit(batch):
    """The in-projection GEMV, then GDN decode, for three steps: eager against CUDA-graph replays of one captured
    step. The decode kernel reads its state tile and conv windows (written by itself the step before) ahead of
    griddepcontrol.wait, while the GEMV still runs; outputs and both states must come out exactly equal."""
    from deltaserve.kernels.gated_delta_rule.triton_decode import fused_recurrent_decode
    from deltaserve.kernels.gemv.triton import gemv

    hk, hv, k, v, w, hidden, slots_n = 16, 32, 128, 128, 4, 2048, 6
    c = 2 * hk * k + hv * v
    g = torch.Generator("cuda").manual_seed(batch)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
    w_in = (rand(c + 2 * hv, hidden) / hidden ** 0.5).bfloat16()
    conv_w = (rand(c, w) / 2).bfloat16()
    a_log, dt_bias = rand(hv) / 4, rand(hv) / 4
    conv0, state0 = rand(slots_n, c, w - 1).bfloat16(), rand(slots_n, hv, k, v) / 8
    slots = torch.arange(slots_n - batch, slots_n, device="cuda", dtype=torch.int32).flip(0)
    xs = [rand(batch, hidden).bfloat16() for _ in range(3)]

    def step(x, conv, state):
        mixed = gemv(x, w_in)
        return fused_recurrent_decode(mixed[:, :c], conv_w, conv, mixed[:, c:c + hv], mixed[:, c + hv:], a_log,
                                      dt_bias, state, slots, hk, k, v)

    with torch.no_grad():
        conv_e, state_e = conv0.clone(), state0.clone()
        eager = [step(x, conv_e, state_e) for x in xs]
        conv_g, state_g, x_in = conv0.clone(), state0.clone(), xs[0].clone()
        step(x_in, conv_g.clone(), state_g.clone())  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(x_in, conv_g, state_g)
        replayed = []
        for x in xs:
            x_in.copy_(x)
            graph.replay()
            replayed.append(out.clone())
        torch.cuda.synchronize()
    for i, (e, r) in enumerate(zip(eager, replayed)):
        assert torch.equal(e, r), f"step {i}: output differs"
    assert torch.equal(state_e, state_g) and torch.equal(conv_e, conv_g)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4], ids=["b1", "b4"])
def test_captured_attention_decode_steps_equal_eager_bit_for_bit(batch):
    """The q|gate|k|v GEMV, the KV store, then attention decode (partial kernel and reduce; the reduce reads its gate
    and context length ahead of griddepcontrol.wait) for three steps at growing contexts: eager against CUDA-graph
    replays of one captured step. Outputs and both caches must come out exactly equal."""
    from deltaserve.kernels.gemv.triton import gemv
    from deltaserve.kernels.paged_attention import write_kv
    from deltaserve.kernels.paged_attention.triton_decode import paged_attention_decode

    h, hkv, d, hidden, bs, max_ctx = 16, 2, 256, 2048, 16, 1024
    blocks = max_ctx // bs
    g = torch.Generator("cuda").manual_seed(batch)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
    w = (rand(2 * (h + hkv) * d, hidden) / hidden ** 0.5).bfloat16()
    caches0 = [rand(batch * blocks, bs, hkv, d).bfloat16() for _ in range(2)]
    tables = torch.randperm(batch * blocks, device="cuda", generator=g).to(torch.int32).view(batch, blocks)
    xs = [rand(batch, hidden).bfloat16() for _ in range(3)]
    ctxs = [torch.tensor([600 + 97 * r + i for r in range(batch)], device="cuda", dtype=torch.int32) for i in range(3)]
    slots = [(tables.gather(1, ((c - 1) // bs).long()[:, None])[:, 0] * bs + (c - 1) % bs).long() for c in ctxs]

    def step(x, ctx, slot, caches):
        y = gemv(x, w)
        q, gate = y[:, :h * d].view(batch, h, d), y[:, h * d:2 * h * d].view(batch, h, d)
        k, v = y[:, 2 * h * d:(2 * h + hkv) * d].view(batch, hkv, d), y[:, (2 * h + hkv) * d:].view(batch, hkv, d)
        write_kv(k, v, *caches, slot)
        return paged_attention_decode(q, *caches, tables, ctx, d ** -0.5, gate, max_ctx)

    with torch.no_grad():
        caches_e = [c.clone() for c in caches0]
        eager = [step(x, c, s, caches_e) for x, c, s in zip(xs, ctxs, slots)]
        caches_g = [c.clone() for c in caches0]
        x_in, ctx_in, slot_in = xs[0].clone(), ctxs[0].clone(), slots[0].clone()
        step(x_in, ctx_in, slot_in, [c.clone() for c in caches0])  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(x_in, ctx_in, slot_in, caches_g)
        replayed = []
        for x, c, s in zip(xs, ctxs, slots):
            x_in.copy_(x), ctx_in.copy_(c), slot_in.copy_(s)
            graph.replay()
            replayed.append(out.clone())
        torch.cuda.synchronize()
    for i, (e, r) in enumerate(zip(eager, replayed)):
        assert torch.equal(e, r), f"step {i}: output differs"
    assert all(torch.equal(a, b) for a, b in zip(caches_e, caches_g))
