"""GPU end to end for the request-level sampling features: logit_bias, min_tokens and structured outputs on the CUDA
path (bf16, CUDA graphs, async scheduling on and off), on the embedded tiny checkpoint. The CPU tests
(tests/unit/test_sampler*, test_structured_output.py, test_async_scheduling.py) pin the semantics; this checks that
the captured decode steps, the GPU sampler and the overlapped launches keep them.
"""
import json
import re

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.sampling_params import StructuredOutputs
from deltaserve.tiny import make_tiny

pytestmark = pytest.mark.gpu

SCHEMA = {"type": "object", "properties": {"a": {"type": "boolean"}, "n": {"type": "integer"}},
          "required": ["a", "n"], "additionalProperties": False}


def schema_ok(text: str) -> bool:
    obj = json.loads(text)
    return set(obj) == {"a", "n"} and type(obj["a"]) is bool and type(obj["n"]) is int


SPECS = {
    "json-schema": (StructuredOutputs(json=SCHEMA), schema_ok),
    "regex": (StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    "choice": (StructuredOutputs(choice=["yes", "no", "maybe (x)"]), lambda t: t in ("yes", "no", "maybe (x)")),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny(str(tmp_path_factory.mktemp("gpu_sampling") / "tiny"))


@pytest.fixture(scope="module", params=[True, False], ids=["async", "sync"])
def llm(tiny, request):
    engine = LLM(tiny, device="cuda", dtype="bfloat16", max_model_len=256, async_scheduling=request.param)
    yield engine
    del engine
    torch.cuda.empty_cache()


def test_logit_bias_forces_and_bans_tokens(llm):
    forced = llm.generate(["hello"] * 3, SamplingParams(temperature=0.7, seed=3, max_tokens=8, logit_bias={11: 100.0}),
                          use_tqdm=False)
    assert all(o.outputs[0].token_ids == [11] * 8 for o in forced)
    free = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].token_ids
    banned = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=8,
                                                    logit_bias={t: -100.0 for t in free}), use_tqdm=False)
    assert not set(banned[0].outputs[0].token_ids) & set(free)


@pytest.mark.parametrize("min_tokens", [1, 4, 7])
def test_min_tokens_holds_the_stop_token_back_exactly(llm, min_tokens):
    """A +100 bias makes token 7 the greedy pick wherever it is allowed: the request ends on token min_tokens + 1."""
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[7], min_tokens=min_tokens,
                            logit_bias={7: 100.0})
    out = llm.generate(["some prompt text"], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == min_tokens + 1 and out.token_ids[-1] == 7 and 7 not in out.token_ids[:-1]
    assert out.finish_reason == "stop"


@pytest.mark.parametrize("case", list(SPECS), ids=list(SPECS))
def test_structured_samples_complete_their_grammar_beside_free_ones(llm, case):
    pytest.importorskip("xgrammar")
    spec, check = SPECS[case]
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=48, structured_outputs=spec) for s in range(6)]
    params += [SamplingParams(temperature=0.9, seed=s, max_tokens=20) for s in range(3)]  # unconstrained rows
    outs = llm.generate(["Answer:"] * len(params), params, use_tqdm=False)
    for o in outs[:6]:
        assert o.outputs[0].finish_reason == "stop" and check(o.outputs[0].text), (case, o.outputs[0].text)
    assert all(len(o.outputs[0].token_ids) == 20 or o.outputs[0].finish_reason == "stop" for o in outs[6:])
