"""What code written for vLLM's offline API finds here: its other spellings of the LLM and SamplingParams arguments are
accepted with the same meaning, or refused in one sentence; nothing is taken and silently given another meaning."""

import gc
import os
import re
import weakref

import numpy as np
import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.tiny import make_tiny


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def llm(path):
    return LLM(model=path, device="cpu", dtype="float32")


def greedy(**kw):
    return SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, **kw)


@pytest.mark.parametrize("dtype", ["float", torch.float32], ids=["float", "torch.float32"])
def test_dtype_spellings(path, llm, dtype):
    other = LLM(model=path, device="cpu", dtype=dtype)
    assert other.dtype == torch.float32
    assert other.generate(["hi"], greedy(), use_tqdm=False)[0].outputs[0].token_ids == \
        llm.generate(["hi"], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="dtype must be"):
        LLM(model=path, device="cpu", dtype="half-ish")


def test_seed_none_trust_remote_code_and_prefix_caching(path):
    """seed=None failed inside torch; trust_remote_code and enable_prefix_caching were TypeErrors (the prefix cache
    itself: tests/unit/test_prefix_cache.py)."""
    other = LLM(model=path, device="cpu", dtype="float32", seed=None, trust_remote_code=True,
                enable_prefix_caching=True, kv_cache_dtype="fp8_e4m3")
    assert other.kv_cache_dtype == "fp8" and other.engine.scheduler.cache is not None
    assert len(other.generate(["hi"], greedy(), use_tqdm=False)[0].outputs[0].token_ids) == 6
    with pytest.raises(ValueError, match="seed must be an integer or None"):
        LLM(model=path, device="cpu", dtype="float32", seed="7")


def test_model_and_tokenizer_paths_expand_a_leading_tilde(path, monkeypatch):
    """LLM(model="~/...") said the directory does not exist (vLLM's users write such paths)."""
    monkeypatch.setenv("HOME", os.path.dirname(path))
    llm = LLM(model="~/model", tokenizer="~/model", device="cpu", dtype="float32", max_model_len=64)
    assert llm.tokenizer is not None
    assert len(llm.generate(["hi"], greedy(), use_tqdm=False)[0].outputs[0].token_ids) == 6


def test_tokenizer_mode_swap_space_and_disable_log_stats(path, llm):
    """Arguments of vLLM's LLM that scripts pass: TypeErrors before; the same engine now, or one sentence."""
    other = LLM(model=path, device="cpu", dtype="float32", tokenizer_mode="slow", swap_space=4,
                disable_log_stats=False)
    assert other.generate(["hi"], greedy(), use_tqdm=False)[0].outputs[0].token_ids == \
        llm.generate(["hi"], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="tokenizer_mode='mistral'"):
        LLM(model=path, device="cpu", tokenizer_mode="mistral")
    with pytest.raises(ValueError, match="swap_space must be a number of GiB"):
        LLM(model=path, device="cpu", swap_space=-1)


def test_quantization_chunked_prefill_and_pipeline_arguments(path, tmp_path):
    """vLLM's quantization names the checkpoint's format (accepted when it matches, one sentence when it asks for a
    conversion); enable_chunked_prefill=True and pipeline_parallel_size=1 are what deltaserve does anyway."""
    from deltaserve.quantize import quantize_checkpoint

    awq = str(tmp_path / "awq")
    quantize_checkpoint(path, awq, group_size=32)
    for name in ("awq", "awq_marlin"):
        assert LLM(awq, device="cpu", quantization=name, enable_chunked_prefill=True, pipeline_parallel_size=1)
    # the hint names the method that writes the asked-for format (it said "write an int4 copy" for fp8 too, and to
    # an int4 checkpoint, which `deltaserve quantize` refuses to quantize again)
    with pytest.raises(ValueError, match=r"holds 16-bit weights: deltaserve runs a checkpoint in the format .*"
                                         r"`deltaserve quantize SRC DST --method fp8`\)$"):
        LLM(path, device="cpu", quantization="fp8")
    with pytest.raises(ValueError, match=r"holds 'awq' weights: .* \(leave quantization out\)$"):
        LLM(awq, device="cpu", quantization="fp8")
    with pytest.raises(ValueError, match="quantization='gptq'"):
        LLM(path, device="cpu", quantization="gptq")
    with pytest.raises(ValueError, match="enable_chunked_prefill=False"):
        LLM(path, device="cpu", enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="pipeline_parallel_size=2"):
        LLM(path, device="cpu", pipeline_parallel_size=2)


def test_get_tokenizer_and_a_tokenized_chat_template(llm):
    tok = llm.get_tokenizer()
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)  # transformers' tokenize=True
    assert isinstance(text, str) and ids == tok.encode(text)
    # transformers' defaults, as vLLM's get_tokenizer() (the HF tokenizer) gives them: a dict of ids, no generation
    # prompt; decode keeps the special tokens
    no_prompt = tok.encode(text.removesuffix("<|im_start|>assistant\n"))
    assert dict(tok.apply_chat_template(msgs)) == {"input_ids": no_prompt, "attention_mask": [1] * len(no_prompt)}
    assert tok.decode(ids) == text and tok(text).input_ids == ids
    by_ids = llm.generate({"prompt_token_ids": ids}, greedy(), use_tqdm=False)[0].outputs[0]
    assert by_ids.token_ids == llm.chat(msgs, greedy(), use_tqdm=False)[0].outputs[0].token_ids


def test_chat_template_kwargs_may_set_add_generation_prompt(llm):
    """It was passed twice (a TypeError); the chat_template_kwargs value wins, as any other template variable."""
    msgs = [{"role": "user", "content": "hi"}]
    out = llm.chat(msgs, greedy(), use_tqdm=False, chat_template_kwargs={"add_generation_prompt": False})[0]
    tok = llm.get_tokenizer()
    assert out.prompt_token_ids == tok.apply_chat_template(msgs, add_generation_prompt=False, return_dict=False)


def test_detokenize_false_and_spaces_between_special_tokens(llm):
    ref = llm.generate(["hi"], greedy(), use_tqdm=False)[0].outputs[0]
    ids_only = llm.generate(["hi"], greedy(detokenize=False), use_tqdm=False)[0].outputs[0]
    assert ids_only.token_ids == ref.token_ids and ids_only.text == "" and ref.text
    spaced = llm.generate(["hi"], greedy(spaces_between_special_tokens=False, skip_special_tokens=False),
                          use_tqdm=False)[0].outputs[0]
    assert spaced.text == llm.generate(["hi"], greedy(skip_special_tokens=False), use_tqdm=False)[0].outputs[0].text
    with pytest.raises(ValueError, match="detokenize=False leaves out"):
        SamplingParams(detokenize=False, stop=["x"])
    with pytest.raises(ValueError, match="^detokenize must be True or False"):
        SamplingParams(detokenize="no")


def test_logprobs_read_as_vllms_logprob_objects(llm):
    """vLLM scripts read .logprob / .rank / .decoded_token (they were plain floats: AttributeError); the values stay
    the floats they were, so float arithmetic and JSON keep working."""
    import json

    out = llm.generate(["hi"], greedy(logprobs=3, prompt_logprobs=2), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    for t, d in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
        chosen = d[t]
        assert chosen.rank == 1 and chosen.logprob == float(chosen) == max(d.values())  # greedy: the argmax
        assert sorted(lp.rank for lp in d.values()) == [1, 2, 3]
        assert all(lp.decoded_token == tok.decode([i], skip_special_tokens=False) for i, lp in d.items())
    for t, d in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert (d[t].rank == 1) == (d[t] == max(d.values())) and d[t].rank >= 1
        assert json.loads(json.dumps(d[t])) == float(d[t])
    sampled = llm.generate(["hi"], SamplingParams(temperature=1.5, seed=3, max_tokens=8, logprobs=0),
                           use_tqdm=False)[0].outputs[0]
    assert any(d[t].rank > 1 for t, d in zip(sampled.token_ids, sampled.logprobs))  # ranks over the vocabulary


def test_detokenize_false_leaves_decoded_token_none(llm):
    """vLLM decodes nothing for a request with detokenize=False: its Logprobs' decoded_token is None (it was the
    token's text here), the logprobs and ranks themselves unchanged."""
    ref = llm.generate(["hi"], greedy(logprobs=2, prompt_logprobs=1), use_tqdm=False)[0]
    out = llm.generate(["hi"], greedy(logprobs=2, prompt_logprobs=1, detokenize=False), use_tqdm=False)[0]
    positions = out.outputs[0].logprobs + out.prompt_logprobs[1:]
    assert positions and all(lp.decoded_token is None for d in positions for lp in d.values())
    assert all(lp.decoded_token is not None for d in ref.outputs[0].logprobs for lp in d.values())
    for r, o in zip(ref.outputs[0].logprobs + ref.prompt_logprobs[1:], positions):
        assert r.keys() == o.keys() and all(r[t].rank == o[t].rank and abs(r[t] - o[t]) < 1e-5 for t in r)


def test_generation_configs_other_eos_ids_are_the_stop_reason(llm):
    """vLLM adds generation_config.json's EOS ids other than the tokenizer's to a request's stop_token_ids, so ending
    on one reports its id as stop_reason (here <|endoftext|>; it was None); the tokenizer's EOS stays None, and
    ignore_eos runs past both."""
    tok = llm.get_tokenizer()
    im_end, endoftext = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert tok.eos_token_id == im_end and endoftext in llm.config.eos_token_ids

    def forced(token: int, **kw):
        return llm.generate(["hi"], SamplingParams(temperature=0, max_tokens=4, logit_bias={token: 100}, **kw),
                            use_tqdm=False)[0].outputs[0]

    out = forced(endoftext)
    assert (out.token_ids, out.finish_reason, out.stop_reason, out.text) == ([endoftext], "stop", endoftext, "")
    out = forced(im_end)
    assert (out.token_ids, out.finish_reason, out.stop_reason) == ([im_end], "stop", None)
    out = forced(endoftext, stop_token_ids=[im_end])
    assert (out.finish_reason, out.stop_reason) == ("stop", endoftext)
    out = forced(endoftext, ignore_eos=True)
    assert (out.token_ids, out.finish_reason, out.stop_reason) == ([endoftext] * 4, "length", None)


def test_chat_continues_the_final_message(llm):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, here"}]
    out = llm.chat(msgs, greedy(), use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    tok = llm.get_tokenizer()
    assert tok.decode(out.prompt_token_ids).endswith("Sure, here")
    # text that also occurs in the template's end of turn: the cut was at its last occurrence, inside "<|im_end|>"
    for text in ("end", "im", "The end"):
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=False, continue_final_message=True, tokenize=False)
        whole = tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
        assert prompt.endswith("\n" + text) and whole[len(prompt):].startswith("<|im_end|>"), (text, prompt)


def test_chat_template_kwargs_that_chat_cannot_take(llm):
    """vLLM's chat_template_kwargs may carry the tools; keys that would replace the conversation or ask for ids,
    and a kwargs value that is not a dict, are refused in one sentence (they were TypeErrors)."""
    msgs = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    by_kwargs = llm.chat(msgs, greedy(), use_tqdm=False, chat_template_kwargs={"tools": tools})[0]
    by_arg = llm.chat(msgs, greedy(), use_tqdm=False, tools=tools)[0]
    assert by_kwargs.prompt_token_ids == by_arg.prompt_token_ids
    for bad, needle in (({"messages": msgs}, "cannot set messages"), ({"tokenize": True}, "cannot set tokenize"),
                        ([("enable_thinking", False)], "must be a dict")):
        with pytest.raises(ValueError, match=needle):
            llm.chat(msgs, greedy(), use_tqdm=False, chat_template_kwargs=bad)
    with pytest.raises(ValueError, match="not both"):
        llm.chat(msgs, greedy(), use_tqdm=False, tools=tools, chat_template_kwargs={"tools": tools})
    with pytest.raises(ValueError, match="at least one conversation"):
        llm.chat([], greedy(), use_tqdm=False)


def test_chat_with_a_template_of_ones_own(llm):
    """vLLM's LLM.chat(chat_template=...) (a TypeError): the given Jinja template renders the conversation."""
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    out = llm.chat([{"role": "user", "content": "hi"}], greedy(), use_tqdm=False, chat_template=template)[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode("[user] hi\n")
    with pytest.raises(Exception, match="not valid Jinja"):
        llm.chat([{"role": "user", "content": "hi"}], greedy(), use_tqdm=False, chat_template="{% for %}")


def test_seed_minus_one_samples_at_random(llm):
    """vLLM reads seed=-1 as "no seed" (clients send it for "random", as llama.cpp's server takes it): it was taken as
    the seed -1, so every request sent with it drew the same tokens."""
    assert SamplingParams(seed=-1).seed is None
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=-1)
    outs = [llm.generate(["hi"], params, use_tqdm=False)[0].outputs[0].token_ids for _ in range(4)]
    assert len(set(map(tuple, outs))) > 1, outs
    seeded = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=-2)  # any other seed stays one
    assert len({tuple(llm.generate(["hi"], seeded, use_tqdm=False)[0].outputs[0].token_ids) for _ in range(2)}) == 1


def test_vllms_lora_request_and_priority_defaults_are_accepted(llm):
    """Scripts written for vLLM pass lora_request=None (a LoRA they may not have) and priority to generate / chat: they
    were TypeErrors; vLLM's defaults now run as without them, and a LoRA or a priority is refused in one sentence."""
    msgs = [{"role": "user", "content": "hi"}]
    ref = llm.generate(["hi", "yo"], greedy(), use_tqdm=False)
    outs = llm.generate(["hi", "yo"], greedy(), use_tqdm=False, lora_request=None, priority=[0, 0])
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert llm.chat(msgs, greedy(), use_tqdm=False, lora_request=None)[0].outputs[0].token_ids == \
        llm.chat(msgs, greedy(), use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="^lora_request=.*no LoRA adapters"):
        llm.generate(["hi"], greedy(), use_tqdm=False, lora_request=object())
    with pytest.raises(ValueError, match="^lora_request=.*no LoRA adapters"):
        llm.chat(msgs, greedy(), use_tqdm=False, lora_request=object())
    with pytest.raises(ValueError, match=r"^priority=\[1\].*first come, first served"):
        llm.generate(["hi"], greedy(), use_tqdm=False, priority=[1])


def test_use_tqdm_may_be_a_tqdm_factory(llm):
    """vLLM calls a callable use_tqdm to make the bar (e.g. partial(tqdm, disable=rank != 0)); it was read as True
    and a default bar was drawn instead."""
    made = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n, self.closed = total, 0, False
            made.append(self)

        def update(self, k=1):
            self.n += k

        def close(self):
            self.closed = True

    assert len(llm.generate(["hi", "yo"], greedy(), use_tqdm=Bar)) == 2
    assert [(b.total, b.n, b.closed) for b in made] == [(2, 2, True)]


def test_progress_bar_shows_token_speeds(llm, capsys):
    """vLLM's bar ends with "est. speed input: X toks/s, output: Y toks/s"; ours counted requests only."""
    from functools import partial

    from tqdm import tqdm

    llm.generate(["hi", "yo"], greedy(), use_tqdm=partial(tqdm, mininterval=0))
    err = capsys.readouterr().err
    assert re.search(r"2/2 .*est\. speed input: [1-9][\d.]* toks/s, output: [1-9][\d.]* toks/s", err), err


def test_sampling_params_of_the_wrong_kind_are_refused_in_one_sentence(llm):
    """A generator of SamplingParams was counted after its check had used it up ("got 0 SamplingParams for 2
    prompts"), and a number was a TypeError from inside the check; a tuple stays one per prompt, as vLLM's Sequence."""
    assert len(llm.generate(["hi", "yo"], (greedy(), greedy()), use_tqdm=False)) == 2
    assert len(llm.generate(["hi", "yo"], (greedy() for _ in range(2)), use_tqdm=False)) == 2
    for bad in (5, [greedy(), 5], {"temperature": 0}):
        with pytest.raises(ValueError, match="^sampling_params must be a SamplingParams or a list of them"):
            llm.generate(["hi", "yo"], bad, use_tqdm=False)


def test_a_tokens_prompt_may_carry_its_text(llm):
    """vLLM's TokensPrompt may hold the ids' text as 'prompt' (vLLM runs the ids and reports the text): such a dict was
    refused as holding both keys."""
    ids = llm.get_tokenizer().encode("hi there")
    ref = llm.generate({"prompt_token_ids": ids}, greedy(), use_tqdm=False)[0]
    out = llm.generate([{"prompt_token_ids": ids, "prompt": "hi there"}], greedy(), use_tqdm=False)[0]
    assert out.prompt == "hi there" and out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids and ref.prompt is None
    with pytest.raises(ValueError, match="^each prompt must be a string"):
        llm.generate([{"prompt_token_ids": ids, "prompt": 5}], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="^a prompt dict takes one of"):
        llm.generate([{}], greedy(), use_tqdm=False)


@pytest.mark.parametrize("kind", [tuple, np.array, torch.tensor], ids=["tuple", "numpy", "torch"])
def test_token_ids_may_come_as_a_tuple_or_an_array(llm, kind):
    """prompt_token_ids given as a tuple or a 1-D numpy / torch array (straight from a tokenizer's tensors) was refused
    as "each prompt must be a string, ... or {'prompt_token_ids': [...]}", which it was; now read as its list."""
    ids = llm.get_tokenizer().encode("hi there")
    ref = llm.generate({"prompt_token_ids": ids}, greedy(), use_tqdm=False)[0]
    out = llm.generate([{"prompt_token_ids": kind(ids)}], greedy(), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids and type(out.prompt_token_ids[0]) is int
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


@pytest.mark.parametrize("key", ["multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids", "cache_salt",
                                 "token_type_ids"])
def test_vllms_optional_prompt_keys_are_absent_when_none(llm, key):
    """vLLM's TextPrompt / TokensPrompt optional keys set to None (as code building the dict for any model writes
    them) were refused as unsupported; vLLM reads None as absent, and so does deltaserve now. A value is still
    refused, as is an unknown key, even None."""
    ids = llm.get_tokenizer().encode("hi there")
    ref = llm.generate({"prompt_token_ids": ids}, greedy(), use_tqdm=False)[0]
    for prompt in ({"prompt": "hi there", key: None}, {"prompt_token_ids": ids, key: None}):
        out = llm.generate(prompt, greedy(), use_tqdm=False)[0]
        assert out.prompt_token_ids == ids and out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.prompt == prompt.get("prompt")
    llm.llm_engine.add_request("none-key", {"prompt": "hi there", key: None}, greedy())
    llm.llm_engine.abort_request("none-key")
    with pytest.raises(ValueError, match=f"'{key}' is not supported"):
        llm.generate({"prompt": "hi there", key: {"x": 1}}, greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="'promt' is not supported"):
        llm.generate({"prompt": "hi there", "promt": None}, greedy(), use_tqdm=False)


def test_a_tokenizers_output_as_a_prompt_says_what_to_pass(llm):
    """get_tokenizer().apply_chat_template returns {'input_ids', 'attention_mask'} by default, as transformers 5 does;
    passed to generate as it is, it was refused as two unsupported keys."""
    enc = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    with pytest.raises(ValueError, match=r"pass \{'prompt_token_ids': enc\['input_ids'\]\}"):
        llm.generate(enc, greedy(), use_tqdm=False)
    out = llm.generate({"prompt_token_ids": enc["input_ids"]}, greedy(), use_tqdm=False)[0]
    assert out.prompt_token_ids == enc["input_ids"]


@pytest.mark.parametrize("bad", [1.0, 0.0, 2.5, "3", None, True, np.float32(1), torch.tensor(1.0)],
                         ids=["1.0", "0.0", "2.5", "str", "None", "True", "np.float32", "float-tensor"])
def test_token_ids_must_be_integers(llm, bad):
    """A float id ({'prompt_token_ids': [1.0, 2]}) was refused as "outside the vocabulary"; vLLM refuses non-integer
    ids too, and now the sentence says that is what is wrong. Integer numpy / torch scalars still run."""
    with pytest.raises(ValueError, match="^prompt token ids must be integers, got"):
        llm.generate({"prompt_token_ids": [bad, 2]}, greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="^prompt token ids must be integers"):  # LLMEngine.add_request too
        llm.llm_engine.add_request("float-ids", {"prompt_token_ids": [bad, 2]}, greedy())
    ref = llm.generate({"prompt_token_ids": [1, 2]}, greedy(), use_tqdm=False)[0]
    for ids in ([np.int64(1), 2], [torch.tensor(1), np.int32(2)], list(torch.tensor([1, 2]))):
        out = llm.generate({"prompt_token_ids": ids}, greedy(), use_tqdm=False)[0]
        assert out.prompt_token_ids == [1, 2] and all(type(t) is int for t in out.prompt_token_ids)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_truncate_prompt_tokens_of_max_model_len_follows_the_prompt_length_rule(path):
    """truncate_prompt_tokens=max_model_len is taken (vLLM's bound), and a prompt it cuts to max_model_len tokens runs
    as any prompt of max_model_len tokens does (vLLM's rule): one token is sampled, finish_reason "length", whatever
    max_tokens asked (it was refused, for want of room for that token, which is never fed); one token more is
    refused; max_model_len - 1 and -1 run it."""
    small = LLM(model=path, device="cpu", dtype="float32", max_model_len=32)
    ids = list(range(1, 41))
    assert len(small.generate({"prompt_token_ids": ids[:20]}, greedy(truncate_prompt_tokens=32),
                              use_tqdm=False)[0].outputs[0].token_ids) == 6
    cut = small.generate({"prompt_token_ids": ids}, greedy(truncate_prompt_tokens=32), use_tqdm=False)[0]
    whole = small.generate({"prompt_token_ids": ids[-32:]}, greedy(), use_tqdm=False)[0]
    assert cut.prompt_token_ids == whole.prompt_token_ids == ids[-32:]
    for out in (cut, whole):
        assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    assert cut.outputs[0].token_ids == whole.outputs[0].token_ids
    with pytest.raises(ValueError, match="^the prompt has 33 tokens but max_model_len is 32: shorten the prompt to "
                                         "at most 32 tokens or raise max_model_len$"):
        small.generate({"prompt_token_ids": ids[:33]}, greedy(), use_tqdm=False)
    out = small.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True,
                                                                   truncate_prompt_tokens=31), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[-31:] and len(out.outputs[0].token_ids) == 1
    out = small.generate({"prompt_token_ids": ids}, greedy(truncate_prompt_tokens=-1), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == 26 and len(out.outputs[0].token_ids) == 6


def test_len_of_get_tokenizer_is_transformers_len(llm, path):
    """len(llm.get_tokenizer()) was a TypeError; code written for vLLM or transformers takes the vocabulary size
    from it."""
    transformers = pytest.importorskip("transformers")
    assert len(llm.get_tokenizer()) == len(transformers.AutoTokenizer.from_pretrained(path))


def test_llm_engine_has_vllms_methods(llm, path):
    """llm.llm_engine was an AttributeError; vLLM scripts reach the tokenizer and max_model_len through it, and drive
    requests by hand with add_request / step."""
    eng = llm.llm_engine
    assert eng.get_tokenizer() is llm.get_tokenizer() is eng.tokenizer
    cfg = eng.get_model_config()
    assert cfg is eng.model_config and cfg.model == path and cfg.tokenizer == path
    assert (cfg.max_model_len, cfg.dtype, cfg.get_vocab_size()) == (llm.max_model_len, torch.float32,
                                                                     llm.config.vocab_size)
    want = llm.generate(["hi"], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    eng.add_request("a", "hi", greedy())
    eng.add_request("b", {"prompt_token_ids": llm.get_tokenizer().encode("hi")}, greedy())
    assert eng.has_unfinished_requests() and eng.get_num_unfinished_requests() == 2
    eng.abort_request(["b"])
    done = {}
    while eng.has_unfinished_requests():
        done.update((out.request_id, out) for out in eng.step() if out.finished)
    assert list(done) == ["a"] and done["a"].outputs[0].token_ids == want
    with pytest.raises(ValueError, match="takes one prompt"):
        eng.add_request("c", ["hi", "ho"], greedy())
    assert not eng.has_unfinished_requests()


def test_llm_engine_add_request_takes_vllms_keyword_arguments(llm):
    """vLLM's LLMEngine.add_request also takes arrival_time (time.time() seconds), lora_request and priority: they
    were TypeErrors. arrival_time is where the outputs' metrics count from; a LoRA or a priority is refused."""
    import time

    eng = llm.llm_engine
    want = llm.generate(["hi"], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    eng.add_request("late", "hi", greedy(), arrival_time=time.time() - 30, lora_request=None, priority=0)
    eng.add_request("now", "hi", greedy(), arrival_time=None)
    done = {}
    while eng.has_unfinished_requests():
        done.update((out.request_id, out) for out in eng.step() if out.finished)
    assert done["late"].outputs[0].token_ids == done["now"].outputs[0].token_ids == want
    late, now = done["late"].metrics, done["now"].metrics
    assert late.first_token_time - late.arrival_time >= 30 > now.first_token_time - now.arrival_time
    for kw, needle in (({"priority": 1}, "^priority=1: .*first come, first served"),
                       ({"lora_request": object()}, "^lora_request=.*no LoRA adapters"),
                       ({"arrival_time": "soon"}, "^arrival_time must be")):
        with pytest.raises(ValueError, match=needle):
            eng.add_request("x", "hi", greedy(), **kw)
    assert not eng.has_unfinished_requests()


def test_llm_engine_keeps_no_cycle_with_its_llm(path):
    """An LLM whose llm_engine was used is still freed when its last reference goes (its tensor-parallel workers stop
    then), not only at the next cyclic garbage collection."""
    other = LLM(model=path, device="cpu", dtype="float32")
    assert other.llm_engine.get_tokenizer() is other.get_tokenizer()
    ref = weakref.ref(other)
    gc.disable()
    try:
        del other
        assert ref() is None
    finally:
        gc.enable()


def test_outputs_have_vllms_other_fields(llm):
    """vLLM scripts call CompletionOutput.finished() and read RequestOutput.encoder_prompt(_token_ids) and
    .lora_request (None for a decoder-only model without adapters); they raised AttributeError."""
    out = llm.generate(["hi"], greedy(), use_tqdm=False)[0]
    assert out.encoder_prompt is None and out.encoder_prompt_token_ids is None and out.lora_request is None
    done = out.outputs[0]
    assert done.finished() is True and done.lora_request is None
    running = next(iter(llm.generate_stream(["hi"], greedy())))
    assert running.outputs[0].finished() is False


def test_logprobs_minus_one_is_the_whole_vocabulary(llm):
    """vLLM's logprobs=-1 / prompt_logprobs=-1 return every token's logprob; they were refused."""
    vocab = llm.config.vocab_size
    params = greedy(logprobs=-1, prompt_logprobs=-1)
    out = llm.generate(["hi there"], params, use_tqdm=False)[0]
    assert params.logprobs == params.prompt_logprobs == -1  # the caller's params are left as they were
    assert [len(d) for d in out.outputs[0].logprobs] == [vocab] * len(out.outputs[0].token_ids)
    assert [len(d) for d in out.prompt_logprobs[1:]] == [vocab] * (len(out.prompt_token_ids) - 1)
    assert sorted(lp.rank for lp in out.outputs[0].logprobs[0].values()) == list(range(1, vocab + 1))
    engine = llm.llm_engine
    engine.add_request("whole", "hi", SamplingParams(max_tokens=1, logprobs=-1))
    done = [o for _ in range(10) for o in engine.step() if o.finished]
    assert len(done[0].outputs[0].logprobs[0]) == vocab
    # the engine itself (the server's AsyncEngine, scripts driving EngineCore): -1 failed mid-step, aborting the batch
    rid = llm.engine.add_request(llm.tokenizer.encode("hi"), SamplingParams(max_tokens=1, prompt_logprobs=-1))
    done = []
    while llm.engine.has_unfinished():
        done += [o for o in llm.engine.step() if o.request_id == rid and o.finished]
    assert [len(d) for d in done[0].prompt_logprobs[1:]] == [vocab] * (len(done[0].prompt_token_ids) - 1)


@pytest.mark.parametrize("messages", [None, "hi", {"role": "user", "content": "hi"}, ["hi", "there"], 5],
                         ids=["none", "string", "one_message", "strings", "int"])
def test_chat_refuses_messages_that_are_not_conversations_in_one_sentence(llm, messages):
    """chat(None) raised TypeError ('NoneType' object is not iterable), chat('hi') complained about a message 'h'."""
    with pytest.raises(ValueError, match="^messages must be a conversation"):
        llm.chat(messages, greedy(), use_tqdm=False)


def test_chat_takes_conversations_from_any_iterable(llm):
    """A tuple of messages or a generator of conversations is a conversation / conversations, as a list is."""
    msgs = [{"role": "user", "content": "hi"}]
    ref = llm.chat(msgs, greedy(), use_tqdm=False)[0].prompt_token_ids
    assert llm.chat(tuple(msgs), greedy(), use_tqdm=False)[0].prompt_token_ids == ref
    assert [o.prompt_token_ids for o in llm.chat((c for c in [msgs, msgs]), greedy(), use_tqdm=False)] == [ref, ref]


# Qwen3.5's template renders a message's content parts in its render_content macro (vLLM's "openai" format)
RENDERS_PARTS = (
    "{% macro render_content(content) %}{% if content is string %}{{ content }}{% else %}{% for item in content %}"
    "{{ item.text }}{% endfor %}{% endif %}{% endmacro %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ render_content(m.content) }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONTENT_FORMAT_CASES = {  # id: (chat_template (None: the tiny model's own), format, the text parts render as)
    "string-template-auto": (None, "auto", "a\nb"),
    "string-template-string": (None, "string", "a\nb"),
    "string-template-openai": (None, "openai", ""),  # the template reads only strings: vLLM renders it empty too
    "parts-template-auto": (RENDERS_PARTS, "auto", "ab"),
    "parts-template-string": (RENDERS_PARTS, "string", "a\nb"),
    "parts-template-openai": (RENDERS_PARTS, "openai", "ab"),
}


@pytest.mark.parametrize("template, fmt, rendered", CONTENT_FORMAT_CASES.values(), ids=CONTENT_FORMAT_CASES.keys())
def test_chat_renders_text_parts_by_vllms_chat_template_content_format(llm, template, fmt, rendered):
    """vLLM's LLM.chat(chat_template_content_format=...) was a TypeError, and a plain string among the parts (vLLM
    takes it as a text part) was refused."""
    parts = [{"type": "text", "text": "a"}, "b"]

    def prompt(content, **kw):
        return llm.chat([{"role": "user", "content": content}], greedy(), use_tqdm=False, chat_template=template,
                        **kw)[0].prompt
    assert prompt(parts, chat_template_content_format=fmt) == prompt(rendered)
    with pytest.raises(ValueError, match="^chat_template_content_format must be 'auto', 'string' or 'openai', got "
                                         "'list'"):
        llm.chat([{"role": "user", "content": "hi"}], greedy(), use_tqdm=False, chat_template_content_format="list")


@pytest.mark.parametrize("part, needle", [
    ({"type": "image_url", "image_url": {"url": "http://x/a.png"}}, r" has a 'image_url' content part.*text-only"),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, r" has a 'input_audio' content part"),
    ({"type": "video_url", "video_url": {"url": "http://x/a.mp4"}}, r" has a 'video_url' content part"),
    ({"image_url": "http://x/a.png"}, r" has a 'image_url' content part"),  # vLLM reads the type from the key
    ({"text": "hi"}, r"\.content\[1\] has no 'type'"),
    ({"type": "text"}, r"\.content\[1\] is a 'text' part without a 'text' string"),
    ({"type": "text", "text": None}, r"\.content\[1\] is a 'text' part without a 'text' string"),
], ids=["image_url", "input_audio", "video_url", "untyped-image", "no-type", "text-without-text", "text-none"])
def test_chat_refuses_non_text_and_malformed_parts_naming_the_message(llm, part, needle):
    """A part the text-only model cannot take, or one that is not a part, is one sentence naming the message (and
    the part); the image's said "A user message's content list may hold only text parts", without saying which."""
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, part]}]
    with pytest.raises(ValueError, match=r"^messages\[1\]" + needle):
        llm.chat(msgs, greedy(), use_tqdm=False)


def test_chat_takes_an_assistant_message_without_content_and_vllms_mm_processor_kwargs_none(llm):
    """An assistant turn of tool calls has no content (or None), as OpenAI sends it; vLLM's mm_processor_kwargs=None
    (a TypeError) runs as without it, and a value, which a text-only model has no processor for, is refused."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    for assistant in ({"role": "assistant", "tool_calls": [call]}, {"role": "assistant", "content": None,
                                                                     "tool_calls": [call]}):
        msgs = [{"role": "user", "content": "hi"}, assistant, {"role": "tool", "tool_call_id": "c1", "content": "1"}]
        assert "<tool_call>" in llm.chat(msgs, greedy(), use_tqdm=False)[0].prompt
    msgs = [{"role": "user", "content": "hi"}]
    assert llm.chat(msgs, greedy(), use_tqdm=False, mm_processor_kwargs=None)[0].outputs[0].token_ids == \
        llm.chat(msgs, greedy(), use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="^mm_processor_kwargs=.*text-only"):
        llm.chat(msgs, greedy(), use_tqdm=False, mm_processor_kwargs={"num_crops": 4})


def test_structured_outputs_params_is_vllms_name_for_structured_outputs(llm):
    """vLLM scripts import StructuredOutputsParams from the sampling_params module (an ImportError here); it is
    deltaserve's StructuredOutputs, json_object=None (vLLM's default) included."""
    from deltaserve.sampling_params import StructuredOutputs, StructuredOutputsParams

    assert StructuredOutputsParams is StructuredOutputs
    spec = StructuredOutputsParams(choice=["yes", "no"], json_object=None)
    assert spec == StructuredOutputs(choice=["yes", "no"])
    params = SamplingParams(temperature=0, max_tokens=8, structured_outputs=spec)
    assert llm.generate(["Answer:"], params, use_tqdm=False)[0].outputs[0].text in ("yes", "no")


def test_sampling_params_clone_is_an_independent_copy():
    """vLLM scripts derive params with .clone() (AttributeError here before); the copy's lists are its own."""
    base = SamplingParams(temperature=0.5, stop=["x"], stop_token_ids=[3], logit_bias={4: 1.0})
    copy = base.clone()
    assert copy == base and copy is not base
    copy.stop.append("y")
    copy.stop_token_ids.append(5)
    copy.logit_bias[6] = 2.0
    assert base.stop == ["x"] and base.stop_token_ids == [3] and base.logit_bias == {4: 1.0}


@pytest.mark.parametrize("kwargs, needle", [
    ({"logits_processors": [lambda ids, logits: logits]}, "^logits_processors .* use logit_bias"),
    ({"guided_decoding": {"choice": ["a", "b"]}}, "^guided_decoding .* structured_outputs=StructuredOutputs"),
], ids=["logits_processors", "guided_decoding"])
def test_vllms_logits_processors_and_guided_decoding_say_what_to_use(kwargs, needle):
    """They were TypeErrors (unexpected keyword argument) that named no replacement."""
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kwargs)


def test_vllms_empty_logits_processors_and_guided_decoding_change_nothing():
    import copy
    import dataclasses

    params = SamplingParams(logits_processors=[], guided_decoding=None, stop="x")
    assert params == SamplingParams(stop="x")
    assert dataclasses.replace(params, n=2, temperature=0.5).n == 2 and copy.deepcopy(params) == params
