"""benchmarks/decode_ab.py: B's settings reach B's builds (while built and while timed) and nothing else, every build
is timed every round, and a bad --set is one clear error (on tiny random models on the CPU)."""
import importlib.util
from pathlib import Path

import pytest

from deltaserve import LLM, bench
from deltaserve.config import ModelConfig
from deltaserve.kernels import int4_gemm
from deltaserve.tiny import tiny_config

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_ab.py"
spec = importlib.util.spec_from_file_location("decode_ab", SCRIPT)
decode_ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(decode_ab)


def test_settings_parse_to_the_module_global_and_a_literal():
    module, name, value = decode_ab.parse_setting("deltaserve.kernels.int4_gemm:DEQUANT_MIN_T=None")
    assert module is int4_gemm and name == "DEQUANT_MIN_T" and value is None
    assert decode_ab.parse_setting("deltaserve.kernels.int4_gemm:USE_MMA=False")[2] is False
    for bad, match in [("deltaserve.kernels.int4_gemm.USE_MMA=False", "MODULE:NAME=VALUE"),
                       ("deltaserve.kernels.int4_gemm:NO_SUCH=1", "has no NO_SUCH"),
                       ("deltaserve.no_such_module:X=1", "no module deltaserve.no_such_module"),
                       ("deltaserve.kernels.int4_gemm:USE_MMA=off", "not a Python literal")]:
        with pytest.raises(ValueError, match=match):
            decode_ab.parse_setting(bad)


def test_applied_puts_the_values_back_even_on_an_error():
    before = int4_gemm.DEQUANT_MIN_T
    with pytest.raises(RuntimeError):
        with decode_ab.applied([(int4_gemm, "DEQUANT_MIN_T", 7)]):
            assert int4_gemm.DEQUANT_MIN_T == 7
            raise RuntimeError
    assert int4_gemm.DEQUANT_MIN_T == before


def test_b_builds_and_only_they_see_the_setting(monkeypatch):
    before = int4_gemm.DEQUANT_MIN_T
    seen = []

    def build():
        seen.append(int4_gemm.DEQUANT_MIN_T)
        return LLM.from_config(ModelConfig.from_dict(tiny_config(256, False, 2)), device="cpu", max_num_seqs=2,
                               num_kv_blocks=16, max_model_len=64)

    timed = []

    def fake_bench(llm, batch, context, steps):
        timed.append((id(llm), int4_gemm.DEQUANT_MIN_T, batch))
        return 0.001 * (2 if int4_gemm.DEQUANT_MIN_T == 7 else 1)

    lines = []
    monkeypatch.setattr(bench, "bench_decode", fake_bench)  # run_ab imports it from deltaserve.bench when called
    medians = decode_ab.run_ab(build, [(int4_gemm, "DEQUANT_MIN_T", 7)], [1, 2], 8, 2, builds=2, rounds=2,
                               out=lines.append)
    assert seen == [before, 7, before, 7]  # A, B, A, B
    assert len({t[0] for t in timed}) == 4 and len(timed) == 4 * 2 * 2  # every build, batch size and round
    assert all((value == 7) == (i // 2 % 2 == 1) for i, (_, value, _) in enumerate(timed))
    assert medians == {"A": [0.001, 0.001], "B": [0.002, 0.002]}
    assert lines[-1] == "batch 2: A 1.000 ms, B 2.000 ms, B / A 2.000"
    assert int4_gemm.DEQUANT_MIN_T == before


def test_bench_decode_runs_through_run_ab_on_the_cpu():
    llm_cfg = ModelConfig.from_dict(tiny_config(256, False, 2))
    medians = decode_ab.run_ab(lambda: LLM.from_config(llm_cfg, device="cpu", max_num_seqs=2, num_kv_blocks=16,
                                                       max_model_len=64),
                               [], [2], 8, 2, builds=1, rounds=1, out=lambda line: None)
    assert set(medians) == {"A", "B"} and all(v[0] > 0 for v in medians.values())


def test_drops_take_their_block_out_and_come_back():
    """--drop: the MoE block returns its input, the router's fixed routes are k distinct experts a token (+ the
    stacked shared expert E), the GDN mixer gives zeros, and every drop is put back after; an unknown name is one
    clear error."""
    import torch

    from deltaserve.layers.gated_deltanet import GatedDeltaNet
    from deltaserve.layers.moe import SparseMoE

    cfg = ModelConfig.from_dict(tiny_config(256, True, 4))
    moe = SparseMoE(cfg)
    x = torch.randn(3, cfg.hidden_size)
    before = SparseMoE.forward, SparseMoE._route
    with decode_ab.applied(decode_ab.drop_settings("mlp")):
        assert moe(x) is x
    with decode_ab.applied(decode_ab.drop_settings("router", cfg.num_experts, cfg.num_experts_per_tok)):
        weights, ids = moe._route(x, moe.shared_expert_gate.weight)
    k = cfg.num_experts_per_tok
    assert ids.shape == (3, k + 1) and all(len(set(row[:k].tolist())) == k for row in ids)
    assert ids[:, k].eq(cfg.num_experts).all() and torch.allclose(weights.sum(1), torch.ones(3))
    assert (SparseMoE.forward, SparseMoE._route) == before
    gdn = GatedDeltaNet(cfg)
    with decode_ab.applied(decode_ab.drop_settings("gdn")):
        outs = [gdn.mix((torch.randn(t, 8),), None, None, None) for t in (3, 2)]
    assert outs[0].shape == (3, gdn.hv, gdn.dv) and not outs[0].any()  # zeros: nothing garbled reaches the router
    assert outs[1].data_ptr() == outs[0].data_ptr()  # slices of one tensor: no allocation, no launch, in a graph
    with pytest.raises(ValueError, match="choose one of mlp, router"):
        decode_ab.drop_settings("attention")
    with pytest.raises(ValueError, match="no MoE router"):
        decode_ab.drop_settings("router", 0, 0)  # a dense model


@pytest.mark.parametrize("drop", decode_ab.DROPS)
def test_a_dropped_block_still_decodes_on_the_cpu(drop):
    """Each drop applied while a tiny MoE model is built and decodes (the A/B timing path): it runs to the end."""
    cfg = ModelConfig.from_dict(tiny_config(256, True, 4))
    settings = decode_ab.drop_settings(drop, cfg.num_experts, cfg.num_experts_per_tok)
    medians = decode_ab.run_ab(lambda: LLM.from_config(cfg, device="cpu", max_num_seqs=2, num_kv_blocks=16,
                                                       max_model_len=64),
                               settings, [1], 8, 2, builds=1, rounds=1, out=lambda line: None)
    assert medians["B"][0] > 0
