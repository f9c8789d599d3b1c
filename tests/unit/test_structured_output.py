"""Structured outputs on the CPU reference path (fp32, tiny random checkpoint, xgrammar).

A random model left alone almost never writes `{"a":true,"n":12}`; constrained, every sample that stops is a
complete instance of its JSON schema / regex / choice, and every sample (also one cut by max_tokens) is a prefix the
grammar accepts token by token. The mask is the sampler's only change: logprobs stay raw, async scheduling reads such
steps before launching the next and gives the same answers, a thinking block opened by the prompt is left free until
`</think>`, and a spec that does not compile is refused in one sentence before anything is queued.
"""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from engine_helpers import StepLog

from deltaserve import LLM, SamplingParams
from deltaserve.runtime.structured_output import GrammarBackend
from deltaserve.sampling_params import StructuredOutputs
from deltaserve.tiny import make_tiny
from deltaserve.worker.sampler import apply_allowed

SCHEMA = {"type": "object", "properties": {"a": {"type": "boolean"}, "n": {"type": "integer"}},
          "required": ["a", "n"], "additionalProperties": False}
SPECS = {  # id -> (spec, check of a finished text)
    "json-schema": (StructuredOutputs(json=SCHEMA),
                    lambda t: set(json.loads(t)) == {"a", "n"} and isinstance(json.loads(t)["a"], bool)
                    and type(json.loads(t)["n"]) is int),
    "json-object": (StructuredOutputs(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    "regex": (StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    "choice": (StructuredOutputs(choice=["yes", "no", "maybe (x)"]), lambda t: t in ("yes", "no", "maybe (x)")),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny(str(tmp_path_factory.mktemp("so") / "tiny"))


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny, device="cpu", dtype="float32", max_model_len=256)


def accepted_prefix(llm, spec: StructuredOutputs, token_ids: list[int]) -> bool:
    """Whether a fresh grammar of `spec` accepts every token of `token_ids` in order."""
    grammar = GrammarBackend(llm.tokenizer, llm.config.vocab_size, set(llm.config.eos_token_ids)).grammar(spec)
    try:
        for t in token_ids:
            grammar.accept(t)
    except RuntimeError:
        return False
    return True


# ---------------------------------------------------------------- the sampler's mask

def test_apply_allowed_unpacks_the_bitmask():
    """Rows 0 and 2 of 3 are constrained over V = 70 (three words, the last partly past V): exactly the tokens whose
    bit is set keep their logit, the others are -inf; row 1 is untouched and the caller's logits are not written."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 70, generator=gen)
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (2, 3), generator=gen, dtype=torch.int64).to(torch.int32)
    before = logits.clone()
    out = apply_allowed(logits, torch.tensor([0, 2]), bitmask)
    assert torch.equal(logits, before) and torch.equal(out[1], logits[1])
    for j, row in enumerate((0, 2)):
        words = [int(w) & 0xFFFFFFFF for w in bitmask[j]]
        want = torch.tensor([bool(words[t // 32] >> (t % 32) & 1) for t in range(70)])
        assert torch.equal(torch.isfinite(out[row]), want)
        assert torch.equal(out[row][want], logits[row][want])


@pytest.mark.parametrize("kwargs, needle", [
    ({}, "exactly one of json, json_object, regex or choice, got none"),
    ({"json": SCHEMA, "regex": "a"}, "exactly one of json, json_object, regex or choice, got ['json', 'regex']"),
    ({"json": 3}, "json must be a JSON schema"),
    ({"choice": []}, "choice must be a list of non-empty strings"),
    ({"choice": "yes"}, "choice must be a list of non-empty strings"),  # not three one-letter choices
    ({"regex": ""}, "regex must be a non-empty string"),
], ids=["none", "two", "json-type", "empty-choice", "string-choice", "empty-regex"])
def test_spec_errors_are_one_sentence(kwargs, needle):
    with pytest.raises(ValueError) as e:
        StructuredOutputs(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- the engine

@pytest.mark.parametrize("case", list(SPECS), ids=list(SPECS))
def test_samples_follow_their_grammar(llm, case):
    spec, check = SPECS[case]
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=48, logprobs=0, structured_outputs=spec)
              for s in range(4)]
    outs = llm.generate(["Answer:"] * 4, params, use_tqdm=False)
    finished = 0
    for o in outs:
        c = o.outputs[0]
        assert accepted_prefix(llm, spec, c.token_ids), (case, c.text)
        assert case != "json-object" or c.text.lstrip().startswith("{"), c.text
        if c.finish_reason == "stop":
            finished += 1
            assert check(c.text), (case, c.text)
    if case != "json-object":  # an open JSON object has no length limit: a random model rarely closes one in time
        assert finished == 4, f"{case}: {finished} of 4 samples completed"
    free = llm.generate(["Answer:"] * 4, [SamplingParams(temperature=0.9, seed=s, max_tokens=48) for s in range(4)],
                        use_tqdm=False)
    assert not any(check_quietly(check, o.outputs[0].text) for o in free), "the model writes this unconstrained"


def check_quietly(check, text: str) -> bool:
    try:
        return bool(check(text))
    except ValueError:
        return False


def test_logprobs_stay_raw_and_n_samples_each_follow(llm):
    """n = 2 seeded samples under one schema both complete it; each token's logprob is the raw model's (the same as
    an unconstrained greedy request reports for that token at the first position)."""
    spec = StructuredOutputs(json=SCHEMA)
    out = llm.generate(["Answer:"], SamplingParams(n=2, temperature=0.9, seed=7, max_tokens=48, logprobs=1,
                                                   structured_outputs=spec), use_tqdm=False)[0]
    assert [c.finish_reason for c in out.outputs] == ["stop", "stop"]
    assert all(SPECS["json-schema"][1](c.text) for c in out.outputs)
    free = llm.generate(["Answer:"], SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)[0]
    raw = free.outputs[0].logprobs[0]
    first = out.outputs[0].logprobs[0]
    top = max(first, key=first.get)
    assert top == free.outputs[0].token_ids[0] and first[top] == pytest.approx(raw[top], abs=1e-5)


def test_async_scheduling_reads_structured_steps_first(tiny):
    """Under async scheduling a structured request's step is read before the next launch (the next mask needs its
    token): the answers equal the synchronous ones, and a plain request batched with it is unchanged."""
    prompts = ["Answer:", "Numbers 1 2 3"]
    params = [SamplingParams(temperature=0.9, seed=3, max_tokens=40, structured_outputs=StructuredOutputs(json=SCHEMA)),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    texts = {}
    for mode in (False, True):
        llm = LLM(tiny, device="cpu", dtype="float32", max_model_len=256, async_scheduling=mode)
        texts[mode] = [(o.outputs[0].text, o.outputs[0].finish_reason)
                       for o in llm.generate(prompts, params, use_tqdm=False)]
    assert texts[True] == texts[False] and texts[True][0][1] == "stop"


def test_preempted_requests_keep_their_grammar(tiny):
    """A KV pool too small for four running requests preempts some (recompute): each keeps its grammar's position,
    so every answer equals the one from a roomy engine, token for token."""
    prompts = [{"prompt_token_ids": list(range(3 + i, 23 + i))} for i in range(6)]
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=30, structured_outputs=StructuredOutputs(json=SCHEMA))
              for s in range(6)]
    tight = LLM(tiny, device="cpu", dtype="float32", max_model_len=64, block_size=4, num_kv_blocks=16, max_num_seqs=4)
    log = StepLog.attach(tight)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert log.preempted_ids(), "no request was preempted: the KV pool is not tight enough"
    roomy = LLM(tiny, device="cpu", dtype="float32", max_model_len=64)
    refs = roomy.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in refs]


def test_grammar_starts_after_an_open_thinking_block(llm):
    """A prompt ending in `<think>` leaves the reasoning free: the +100 bias makes `</think>` the first token, and
    only the tokens after it must be one of the choices."""
    tok = llm.tokenizer
    end = tok.token_to_id("</think>")
    prompt = {"prompt_token_ids": tok.encode("<|im_start|>assistant\n<think>\n")}
    spec = StructuredOutputs(choice=["yes", "no"])
    out = llm.generate([prompt], SamplingParams(temperature=0.9, seed=1, max_tokens=20, logit_bias={end: 100.0},
                                                structured_outputs=spec), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] == end and out.finish_reason == "stop"
    assert tok.decode(out.token_ids[1:]) in ("yes", "no")


def test_a_think_tag_quoted_in_an_earlier_turn_leaves_the_answer_constrained(llm):
    """The last `<think>` anywhere in the prompt counted: a user asking about the tag made the grammar wait for a
    `</think>` that never came, and the whole answer ran unconstrained. Only the last turn counts now."""
    tok = llm.tokenizer
    prompt = {"prompt_token_ids": tok.encode("<|im_start|>user\nWhat does <think> do?<|im_end|>\n"
                                             "<|im_start|>assistant\n")}
    assert tok.token_to_id("<think>") in prompt["prompt_token_ids"]
    spec = StructuredOutputs(choice=["yes", "no"])
    outs = llm.generate([prompt], SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=20,
                                                 structured_outputs=spec), use_tqdm=False)[0].outputs
    assert all(o.finish_reason == "stop" and o.text in ("yes", "no") for o in outs), [o.text for o in outs]


@pytest.mark.parametrize("spec, needle", [
    (StructuredOutputs(json={"type": "bogus"}), 'the JSON schema does not compile: Unsupported type "bogus"'),
    (StructuredOutputs(json="{not json"), "the JSON schema does not compile: Failed to parse JSON"),
    (StructuredOutputs(json={"enum": {1, 2}}), "the JSON schema is not JSON (Object of type set"),
    (StructuredOutputs(regex="(ab"), "the regex does not compile: "),
    (StructuredOutputs(regex="[^\\s\\S]"), "the regex matches no text the model can write"),
], ids=["schema-type", "schema-syntax", "schema-not-json", "regex", "regex-matching-nothing"])
def test_bad_spec_is_refused_before_queueing(llm, spec, needle):
    with pytest.raises(ValueError) as e:
        llm.generate(["x", "y"], SamplingParams(max_tokens=4, structured_outputs=spec), use_tqdm=False)
    assert str(e.value).startswith("structured output: ") and needle in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and not llm.engine.has_unfinished()
    assert llm.generate(["x"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("schema, needle", [
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "'allOf' with 2 schemas (in the schema)"),
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "'not' (in properties.a)"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "integer", "if": {"minimum": 5}, "then": {"maximum": 3}}, "'if'"),
    ({"anyOf": [{"type": "object", "dependentRequired": {"a": ["b"]}}]}, "'dependentRequired' (in anyOf[0])"),
    ({"type": "object", "properties": {}, "required": ["x"]}, "'required' naming 'x'"),
    ({"type": "object", "patternProperties": {"^a": {"type": "integer"}}, "required": ["ab"]}, "'required' naming"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "dependentSchemas": {"a": {"required": ["a"]}}},
     "'dependentSchemas'"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "'oneOf' whose schemas one answer could match together"),
    ({"type": "object", "properties": {"s": {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}}},
     "'oneOf' whose schemas one answer could match together (in properties.s"),
    ({"oneOf": [{"enum": [1, 2]}, {"enum": [2.0, 3]}]}, "'oneOf'"),
    ({"$defs": {"A": {"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
                "B": {"type": "object", "properties": {"k": {"const": "a"}, "n": {"type": "integer"}},
                      "required": ["k"]}},
      "oneOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}]}, "'oneOf'"),
    ({"$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}, "required": ["next"]}},
      "oneOf": [{"$ref": "#/$defs/N"}, {"$ref": "#/$defs/N"}]}, "'oneOf'"),
    ({"oneOf": [{"const": {"a": [1]}}, {"const": {"a": [1.0]}}]}, "'oneOf'"),  # 1 and 1.0 are one JSON value
], ids=["allOf", "not", "uniqueItems", "if-then", "dependentRequired", "required-undefined", "required-by-pattern",
        "dependentSchemas", "oneOf-number-types", "oneOf-same-type", "oneOf-shared-enum-value", "oneOf-same-tag",
        "oneOf-recursive", "oneOf-equal-consts-spelled-apart"])
def test_schema_keywords_the_grammar_would_not_enforce_are_refused(llm, schema, needle):
    """xgrammar compiles these and ignores them: the answer broke the schema and still reported "stop"."""
    with pytest.raises(ValueError) as e:
        llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputs(json=schema)),
                     use_tqdm=False)
    assert needle in str(e.value) and "does not enforce" in str(e.value), str(e.value)


def test_enforceable_schema_drops_only_what_would_be_refused():
    """A forced tool choice constrains to the tool's parameters: keywords the grammar ignores are dropped there (the
    same call as before), everything it enforces is kept, and the result passes the refusal check."""
    from deltaserve.runtime.structured_output import _unenforced_feature, enforceable_schema

    schema = {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "not": {"const": ""}}, "uniqueItems": True,
                 "maxItems": 3},
        "n": {"type": "integer", "minimum": 0, "if": {"minimum": 5}, "then": {"maximum": 9}},
        "x": {"allOf": [{"type": "string"}, {"maxLength": 3}]},
        "old": {"type": "string", "required": True},
        "one": {"oneOf": [{"type": "number"}, {"type": "integer"}]}, "tag": {"oneOf": [{"const": 1}, {"const": 2}]}},
        "required": ["tags", "ghost"], "additionalProperties": False, "dependentSchemas": {"n": {"required": ["x"]}}}
    out = enforceable_schema(schema)
    assert out == {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "n": {"type": "integer", "minimum": 0}, "x": {}, "old": {"type": "string", "required": True},
        "one": {"anyOf": [{"type": "number"}, {"type": "integer"}]}, "tag": {"oneOf": [{"const": 1}, {"const": 2}]}},
        "required": ["tags"], "additionalProperties": False}
    assert _unenforced_feature(json.dumps(out)) is None and _unenforced_feature(json.dumps(schema)) is not None
    assert schema["properties"]["tags"]["uniqueItems"] is True  # the caller's schema is left alone


def test_one_of_over_schemas_no_answer_can_match_together_is_accepted(llm):
    """xgrammar compiles 'oneOf' as 'anyOf' (an answer matching two of its schemas passed): a oneOf whose schemas no
    value can match together means the same and is accepted: a tagged union through $defs (pydantic's discriminated
    unions), schemas of different types, distinct consts. The answer matches exactly one."""
    schema = {"$defs": {
        "Cat": {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                "required": ["kind", "lives"], "additionalProperties": False},
        "Dog": {"type": "object", "properties": {"kind": {"enum": ["dog"]}, "lives": {"type": "integer"}},
                "required": ["kind"], "additionalProperties": False}},
        "type": "object", "properties": {
            "pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]},
            "n": {"oneOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]},
            "c": {"oneOf": [{"const": 1}, {"const": True}, {"const": "1"}]}},
        "required": ["pet", "n", "c"], "additionalProperties": False}
    out = llm.generate(["x"], SamplingParams(max_tokens=80, structured_outputs=StructuredOutputs(json=schema)),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason in ("stop", "length")  # compiled, not refused
    if out.finish_reason == "stop":
        answer = json.loads(out.text)
        assert answer["pet"]["kind"] in ("cat", "dog") and any(answer["c"] == c and type(answer["c"]) is type(c)
                                                               for c in (1, True, "1"))


def test_enforced_keywords_and_look_alike_names_compile(llm):
    """What xgrammar does enforce stays accepted, as do properties merely named like keywords and data under
    enum / const / default."""
    schema = {"type": "object", "properties": {
        "not": {"type": "integer", "minimum": 1, "maximum": 9}, "if": {"type": "string", "maxLength": 3},
        "tags": {"type": "array", "items": {"enum": [{"not": 1}]}, "minItems": 1, "maxItems": 2},
        "one": {"allOf": [{"type": "boolean"}]}, "pick": {"oneOf": [{"type": "integer"}, {"type": "null"}]},
        "old": {"type": "integer", "required": True}},  # draft 3's per-property flag: compiles, names nothing
        "required": ["not", "if", "tags", "one", "pick"], "additionalProperties": False,
        "default": {"uniqueItems": True}}
    out = llm.generate(["x"], SamplingParams(max_tokens=1, structured_outputs=StructuredOutputs(json=schema)),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length"


def test_length_limited_strings_never_hold_raw_control_bytes(llm):
    """xgrammar 0.2.9 lets raw control bytes into a string with minLength / maxLength; JSON never holds them raw, so
    the answer failed json.loads. A JSON grammar's mask now excludes them: with the byte 0x1f pushed hard by
    logit_bias, every answer still parses (before, each put it inside the string)."""
    tok = llm.tokenizer
    unit_separator = tok.token_to_id(chr(256 + 0x1F))  # byte-level BPE spelling of byte 0x1f
    tab = tok.token_to_id(chr(256 + 0x09))  # a string with maxLength took a raw tab too
    assert unit_separator is not None and tab is not None
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 5}},
              "required": ["s"], "additionalProperties": False}
    outs = llm.generate(["x"], SamplingParams(n=4, temperature=1.0, seed=2, max_tokens=40, logit_bias={
        unit_separator: 30.0, tab: 30.0}, structured_outputs=StructuredOutputs(json=schema)), use_tqdm=False)[0].outputs
    for o in outs:
        assert o.finish_reason == "stop" and not {unit_separator, tab} & set(o.token_ids), o.token_ids
        assert 1 <= len(json.loads(o.text)["s"]) <= 5


def test_a_schema_dict_keeps_its_property_order(llm):
    """The dict was serialised with sorted keys, so properties came out alphabetically, not in schema order (OpenAI's
    and vLLM's order): greedy answers to the same schema as a dict and as a string now have the same key order."""
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    texts = [llm.generate(["x"], SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputs(
        json=spec)), use_tqdm=False)[0].outputs[0].text for spec in (schema, json.dumps(schema))]
    assert [list(json.loads(t)) for t in texts] == [["zeta", "alpha"]] * 2, texts


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_a_grammar_dead_end_ends_only_its_request(llm, temperature):
    """The regex ab[^\\s\\S] allows "ab" and then nothing: the row used to be sampled anyway, its token failed the
    grammar and the error ended every request of the step. Now that request ends with finish_reason "abort" after
    "ab" (EOS, the only token allowed there, is not text), and the request batched with it answers as alone."""
    plain = SamplingParams(max_tokens=8, temperature=0)
    dead = SamplingParams(max_tokens=8, temperature=temperature, seed=1,
                          structured_outputs=StructuredOutputs(regex="ab[^\\s\\S]"))
    outs = llm.generate(["hi", "hello there"], [dead, plain], use_tqdm=False)
    assert outs[0].outputs[0].text == "ab" and outs[0].outputs[0].finish_reason == "abort"
    solo = llm.generate(["hello there"], plain, use_tqdm=False)[0].outputs[0]
    assert outs[1].outputs[0].token_ids == solo.token_ids and outs[1].outputs[0].finish_reason == solo.finish_reason
    assert not llm.engine.has_unfinished()


def test_dead_end_with_an_eos_id_past_the_logits(llm):
    """A configured EOS id at or past the logits' width has no bit in the mask: the dead-end fill
    indexed past the row (an IndexError failing the step) instead of setting only the EOS bits that exist."""
    vocab = llm.config.vocab_size
    backend = GrammarBackend(llm.tokenizer, vocab, {514, vocab, vocab + 40})
    grammar = backend.grammar(StructuredOutputs(regex="a[^\\s\\S]"))
    for t in llm.tokenizer.encode("a"):
        grammar.accept(t)
    bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    grammar.fill(bitmask, 0)
    assert grammar.dead_end and bitmask[0, 514 // 32] == 1 << (514 % 32) and int(bitmask.ne(0).sum()) == 1


def test_special_tokens_never_inside_constrained_text(llm):
    """Inside a JSON string any text may come, but not a special token (`<|im_start|>`: the detokenizer would drop
    it from the answer); `</think>`, an ordinary added token, may. EOS ends the text once it is complete."""
    tok = llm.tokenizer
    grammar = GrammarBackend(tok, llm.config.vocab_size, set(llm.config.eos_token_ids)).grammar(
        StructuredOutputs(json={"type": "string"}))
    grammar.accept(tok.encode('"')[0])
    bitmask = torch.zeros(1, (llm.config.vocab_size + 31) // 32, dtype=torch.int32)
    grammar.fill(bitmask, 0)
    allowed = torch.isfinite(apply_allowed(torch.zeros(1, llm.config.vocab_size), torch.tensor([0]), bitmask))[0]
    assert tok.special_token_ids and not any(allowed[i] for i in tok.special_token_ids)
    assert allowed[tok.encode("a")[0]] and allowed[tok.token_to_id("</think>")]
    assert not grammar.accept(tok.encode('"')[0]) and grammar.accept(sorted(llm.config.eos_token_ids)[0])


def test_missing_xgrammar_is_one_sentence(tiny, monkeypatch):
    """Without the optional package, a structured request is refused with the install command; others still run."""
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now raises ImportError
    llm = LLM(tiny, device="cpu", dtype="float32", max_model_len=64)
    with pytest.raises(ValueError) as e:
        llm.generate(["x"], SamplingParams(max_tokens=2, structured_outputs=StructuredOutputs(regex="a")),
                     use_tqdm=False)
    assert str(e.value) == "structured outputs need the xgrammar package: pip install 'deltaserve[structured]'"
    assert llm.generate(["x"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
