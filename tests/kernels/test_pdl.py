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
    """35B-A3B shapes, mixed AWQ: residual RMSNorm, then the MoE block (fused router, per-pair int4 GEMVs, split
    sums, combine), eager against a CUDA-graph replay. Every kernel runs the same arithmetic in the same order, so
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
