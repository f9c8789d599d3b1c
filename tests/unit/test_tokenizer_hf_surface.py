"""llm.get_tokenizer() (HFTokenizer) against transformers' AutoTokenizer of the same Qwen3.5 tokenizer folder: every
transformers-named member gives transformers' result, at transformers' defaults."""
import json
import os

import pytest

from deltaserve.hf_tokenizer import HFTokenizer
from deltaserve.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TEXTS = {
    "ascii": "Hello, world! The meeting is at 09:30 on 12 March.",
    "empty": "",
    "cjk": "你好，世界。今日は良い天気ですね。안녕하세요",
    "emoji": "Great job 🎉🚀 👩‍👩‍👧 ✅",
    "marks": "नमस्ते दुनिया สวัสดีครับ naïve café",
    "special": "<|im_start|>user\nhi <think>x</think><|im_end|>\n<|endoftext|>",
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CHATS = {
    "user": ([{"role": "user", "content": "Hi there 👋"}], {}),
    "system_multi_turn": ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4", "reasoning_content": "Sum."},
                           {"role": "user", "content": "日本語で"}], {}),
    "tools": ([{"role": "user", "content": "Weather in Zürich?"}], {"tools": TOOLS}),
    "no_thinking": ([{"role": "user", "content": "Quick"}], {"enable_thinking": False}),
}


@pytest.fixture(scope="module")
def qwen35_dir(tokenizer_dir, tmp_path_factory):
    """The tiny tokenizer beside a Qwen3.5 config.json: transformers loads it as Qwen3_5Tokenizer."""
    path = tmp_path_factory.mktemp("qwen35_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes(open(os.path.join(tokenizer_dir, name), "rb").read())
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    return str(path)


@pytest.fixture(scope="module")
def pair(qwen35_dir):
    hf = transformers.AutoTokenizer.from_pretrained(qwen35_dir)
    assert type(hf).__name__ == "Qwen3_5Tokenizer"
    return HFTokenizer(Tokenizer.from_dir(qwen35_dir)), hf


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_call_encode_decode_match_transformers(pair, text):
    ours, hf = pair
    assert dict(ours(text)) == dict(hf(text))
    assert ours(text).input_ids == hf(text).input_ids and ours(text).attention_mask == hf(text).attention_mask
    assert dict(ours(text, add_special_tokens=False)) == dict(hf(text, add_special_tokens=False))
    assert dict(ours(text, return_attention_mask=False)) == dict(hf(text, return_attention_mask=False))
    ids = ours.encode(text)
    assert ids == hf.encode(text) == ours.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids)  # special tokens kept, as transformers' default
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(torch.tensor(ids, dtype=torch.long)) == hf.decode(torch.tensor(ids, dtype=torch.long))
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf.convert_ids_to_tokens(
        ids, skip_special_tokens=True)
    assert ours.convert_tokens_to_ids(hf.convert_ids_to_tokens(ids)) == ids


def test_batches_and_tensors_match_transformers(pair):
    ours, hf = pair
    texts = list(TEXTS.values())
    assert dict(ours(texts)) == dict(hf(texts))
    ids = [hf.encode(t) for t in texts]
    assert ours.batch_decode(ids) == hf.batch_decode(ids)
    assert ours.batch_decode(ids, skip_special_tokens=True) == hf.batch_decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) == hf.decode(ids)  # a list of lists decodes to a list, as in transformers 5
    assert ours.decode(ids[-1][0]) == hf.decode(ids[-1][0])  # one id
    same_length = ["the quick fox", "the lazy dog"]  # 6 ids each
    for got, want in ((ours(texts[0], return_tensors="pt"), hf(texts[0], return_tensors="pt")),
                      (ours(same_length, return_tensors="pt"), hf(same_length, return_tensors="pt"))):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    two_d = torch.tensor([hf.encode(t) for t in same_length])
    assert ours.batch_decode(two_d) == hf.batch_decode(two_d) and ours.decode(two_d) == hf.decode(two_d)
    assert torch.equal(ours.encode(texts[0], return_tensors="pt"), hf.encode(texts[0], return_tensors="pt"))
    with pytest.raises(TokenizerError, match=r"^return_tensors='pt' needs texts of one token length"):
        ours(["a", "a b c"], return_tensors="pt")


@pytest.mark.parametrize("tokenize", [True, False], ids=["ids", "text"])
@pytest.mark.parametrize("add_generation_prompt", [None, True, False], ids=["default-gen", "gen", "no-gen"])
@pytest.mark.parametrize("messages,kwargs", CHATS.values(), ids=CHATS.keys())
def test_apply_chat_template_matches_transformers(pair, messages, kwargs, add_generation_prompt, tokenize):
    ours, hf = pair
    if add_generation_prompt is not None:
        kwargs = {**kwargs, "add_generation_prompt": add_generation_prompt}
    got, want = ours.apply_chat_template(messages, tokenize=tokenize, **kwargs), hf.apply_chat_template(
        messages, tokenize=tokenize, **kwargs)
    assert (dict(got) == dict(want)) if tokenize else (got == want)
    if tokenize:
        assert ours.apply_chat_template(messages, return_dict=False, **kwargs) == hf.apply_chat_template(
            messages, return_dict=False, **kwargs)


def test_apply_chat_template_defaults_batches_and_tensors_match_transformers(pair):
    ours, hf = pair
    msgs = CHATS["user"][0]
    assert dict(ours.apply_chat_template(msgs)) == dict(hf.apply_chat_template(msgs))  # ids, no generation prompt
    batch = [msgs, CHATS["system_multi_turn"][0]]
    for kw in ({}, {"tokenize": False}, {"return_dict": False}, {"add_generation_prompt": True}):
        got, want = ours.apply_chat_template(batch, **kw), hf.apply_chat_template(batch, **kw)
        assert (dict(got) == dict(want)) if isinstance(want, dict) else got == want, kw
    got, want = ours.apply_chat_template(msgs, return_tensors="pt"), hf.apply_chat_template(msgs, return_tensors="pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    final = [msgs[0], {"role": "assistant", "content": "Sure, the"}]
    assert ours.apply_chat_template(final, continue_final_message=True, tokenize=False) == hf.apply_chat_template(
        final, continue_final_message=True, tokenize=False)


def test_vocabulary_and_special_token_members_match_transformers(pair, qwen35_dir):
    ours, hf = pair
    for name in ("vocab_size", "eos_token", "eos_token_id", "pad_token", "pad_token_id", "bos_token", "bos_token_id",
                 "unk_token", "unk_token_id", "all_special_tokens", "all_special_ids", "model_max_length",
                 "name_or_path", "padding_side", "is_fast"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert len(ours) == len(hf) and ours.vocab_size < len(ours) and ours.get_vocab() == hf.get_vocab()
    tokens = ["<|im_end|>", "<think>", "Ġthe", "not-a-token"]
    assert ours.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("<|im_end|>") == hf.convert_tokens_to_ids("<|im_end|>") == ours.eos_token_id
    assert ours.convert_tokens_to_ids("not-a-token") is hf.convert_tokens_to_ids("not-a-token") is None
    im_start = hf.convert_tokens_to_ids("<|im_start|>")
    assert ours.convert_ids_to_tokens(im_start, skip_special_tokens=True) == hf.convert_ids_to_tokens(
        im_start, skip_special_tokens=True)
    assert ours.name_or_path == qwen35_dir


def test_special_tokens_of_a_richer_config_match_transformers(qwen35_dir, tmp_path):
    """all_special_tokens lists the named tokens, model-specific ones (image_token) and the extra ones, each once;
    model_max_length without a config value is transformers' "no limit"."""
    for name in ("tokenizer.json", "config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(qwen35_dir, name), "rb").read())
    config = json.loads(open(os.path.join(qwen35_dir, "tokenizer_config.json")).read())
    config.pop("model_max_length")
    config.update(image_token="<tool_call>", unk_token="<|endoftext|>",
                  additional_special_tokens=["<think>", "<|im_start|>", "<|im_end|>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = HFTokenizer(Tokenizer.from_dir(str(tmp_path))), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for name in ("all_special_tokens", "all_special_ids", "model_max_length", "unk_token", "unk_token_id"):
        assert getattr(ours, name) == getattr(hf, name), name


@pytest.mark.parametrize("call, needle", [
    (lambda t: t("a", padding=True), r"^tokenizer\(padding=True\) is not supported .*; leave padding at False"),
    (lambda t: t("a", truncation=True, max_length=2), r"^tokenizer\(truncation=True\)"),
    (lambda t: t.encode("a", "b"), r"^encode\(text_pair='b'\)"),
    (lambda t: t("a", return_tensors="np"), r"^return_tensors='np' is not supported"),
    (lambda t: t([["a"]]), r"^tokenizer\(text\) takes a string or a list of strings"),
    (lambda t: t.apply_chat_template(CHATS["user"][0], sanitize_control_tokens=True),
     r"^apply_chat_template\(sanitize_control_tokens=True\)"),
    (lambda t: t.apply_chat_template(CHATS["user"][0], continue_final_message="x"), r"must be True or False"),
], ids=["padding", "truncation", "text-pair", "numpy", "pretokenized", "sanitize", "continue-str"])
def test_unsupported_transformers_keywords_are_refused_in_one_sentence(pair, call, needle):
    with pytest.raises(TokenizerError, match=needle) as e:
        call(pair[0])
    assert "\n" not in str(e.value)


def test_keywords_at_transformers_defaults_are_accepted(pair):
    ours, hf = pair
    kw = {"padding": False, "truncation": None, "max_length": None, "return_token_type_ids": None, "verbose": True}
    assert dict(ours("hi", **kw)) == dict(hf("hi", **kw))
    assert ours.decode([5], clean_up_tokenization_spaces=False) == hf.decode([5], clean_up_tokenization_spaces=False)
    assert dict(ours.apply_chat_template(CHATS["user"][0], padding=False, truncation=False)) == dict(
        hf.apply_chat_template(CHATS["user"][0], padding=False, truncation=False))
    with pytest.raises(TypeError, match="unexpected keyword argument 'paddding'"):
        ours("hi", paddding=True)


def test_engine_tokenizer_keeps_its_own_defaults_and_shares_the_template(qwen35_dir):
    """The engine, server and CLI use Tokenizer, whose defaults stay deltaserve's: decode skips special tokens,
    apply_chat_template renders text with a generation prompt. A template set on either is the other's too."""
    engine = Tokenizer.from_dir(qwen35_dir)
    view = HFTokenizer(engine)
    ids = engine.encode(TEXTS["special"])
    assert engine.decode(ids) == view.decode(ids, skip_special_tokens=True) != view.decode(ids)
    msgs = CHATS["user"][0]
    assert engine.apply_chat_template(msgs) == view.apply_chat_template(msgs, add_generation_prompt=True,
                                                                         tokenize=False)
    view.set_chat_template("[{{ messages[0].content }}]")
    assert engine.apply_chat_template(msgs) == "[Hi there 👋]" == view.apply_chat_template(msgs, tokenize=False)
    assert view.token_to_id("<|im_end|>") == view.eos_token_id and view.id_to_token(view.eos_token_id) == "<|im_end|>"
