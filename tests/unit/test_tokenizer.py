"""deltaserve.tokenizer: round trips, HF transformers parity (encode + chat template), streaming detokenization."""
import json
import os

import pytest
from test_weights import make_unreadable

from deltaserve.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError, train_tiny_tokenizer

TEXTS = {
    "ascii": "Hello, world! The meeting is at 09:30 on 12 March.",
    "code": 'def f(x):\n    return {"a": x ** 2}  # square\n\n\tprint(f(3))',
    "cjk": "你好，世界。今日は良い天気ですね。안녕하세요",
    "emoji": "Great job 🎉🚀 👩‍👩‍👧 ✅",
    "mixed": "naïve café — 東京 🗼 costs ¥2,000 (≈ $13.50)\r\n",
    "rare_bytes": "\x00\x07 tab\t zwj\u200d bom\ufeff nbsp\u00a0",
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"}},
                "required": ["city"],
            },
        },
    }
]
CONVERSATIONS = {
    "system_user": ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}], {}),
    "multi_turn": (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Simple arithmetic."},
            {"role": "user", "content": "And 3+3? 日本語で"},
        ],
        {},
    ),
    "last_assistant_reasoning": (
        [
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hi!", "reasoning_content": "Greet them."},
        ],
        {"add_generation_prompt": False},
    ),
    "tools": (
        [
            {"role": "system", "content": "Use tools when useful."},
            {"role": "user", "content": "Weather in Zürich?"},
            {
                "role": "assistant",
                "content": None,  # OpenAI style: must render like a missing key
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
                ],
            },
            {"role": "tool", "content": '{"temp_c": 21}'},
            {"role": "tool", "content": '{"wind": "calm"}'},
        ],
        {"tools": TOOLS},
    ),
    "no_thinking": ([{"role": "user", "content": "Quick answer please"}], {"enable_thinking": False}),
}


def test_train_is_deterministic_and_sized(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    n = train_tiny_tokenizer(str(a), vocab_size=400)
    assert n == train_tiny_tokenizer(str(b), vocab_size=400) == 400 + 9  # base + 3 special + 6 chat tokens
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    config = json.loads((a / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["bos_token"] is None
    assert config["added_tokens_decoder"]["400"]["content"] == "<|endoftext|>"


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_merges_were_learned(tok):
    # far fewer ids than bytes for English, so BPE really merged
    text = "Language models are trained on a great deal of text"
    assert len(tok.encode(text)) < len(text.encode()) // 2


SINGLE_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>")


@pytest.mark.parametrize("token", SINGLE_TOKENS, ids=SINGLE_TOKENS)
def test_added_tokens_are_single_ids(tok, token):
    token_id = tok.token_to_id(token)
    assert token_id is not None and tok.id_to_token(token_id) == token
    assert tok.encode(f"a{token}b")[1:-1] == [token_id]


def test_special_tokens_skipped_on_decode(tok):
    ids = tok.encode("<|im_start|>user\n<think>x</think><|im_end|>")
    assert tok.decode(ids) == "user\n<think>x</think>"  # <think> is an added but not a special token
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\n<think>x</think><|im_end|>"
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")


def test_vocab_size_matches_hf(tok, hf_tok):
    assert tok.vocab_size == len(hf_tok)
    assert tok.eos_token_id == hf_tok.eos_token_id


ENCODE_CASES = {**TEXTS, "chatml": "<|im_start|>user\nhi <tool_call>{}</tool_call><|im_end|>\n"}


@pytest.mark.parametrize("text", ENCODE_CASES.values(), ids=ENCODE_CASES.keys())
def test_encode_matches_hf(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text)  # Qwen adds no BOS
    ids = tok.encode(text)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("messages,kwargs", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_chat_template_matches_hf(tok, hf_tok, messages, kwargs):
    kwargs = {"add_generation_prompt": True, **kwargs}
    ours = tok.apply_chat_template(messages, **kwargs)
    ref = hf_tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours == ref
    assert tok.encode(ours) == hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


@pytest.mark.parametrize("final", ['{"name": ', "Sure, the answer", "  padded  "], ids=["trailing-space", "plain",
                                                                                     "padded"])
def test_continue_final_message_matches_hf(tok, hf_tok, final):
    """vLLM's / HF's continue_final_message: the text ends right after the last message, for the model to go on."""
    msgs = [{"role": "user", "content": "Give JSON"}, {"role": "assistant", "content": final}]
    ours = tok.apply_chat_template(msgs, add_generation_prompt=False, continue_final_message=True)
    assert ours == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False,
                                              continue_final_message=True)
    assert ours.endswith(final) and tok.apply_chat_template(
        msgs, add_generation_prompt=False, continue_final_message=True, tokenize=True) == tok.encode(ours)
    with pytest.raises(TokenizerError, match="cannot be combined with add_generation_prompt"):
        tok.apply_chat_template(msgs, continue_final_message=True)


def test_chat_template_features(tok):
    text = tok.apply_chat_template(*CONVERSATIONS["tools"][:1], tools=TOOLS)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert "Zürich" in text  # tojson keeps non-ASCII as is, like HF's
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\n{\"temp_c\": 21}\n</tool_response>\n<tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    no_think = tok.apply_chat_template(*CONVERSATIONS["no_thinking"][:1], enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    last = tok.apply_chat_template(CONVERSATIONS["last_assistant_reasoning"][0], add_generation_prompt=False)
    assert last.endswith("<|im_start|>assistant\n<think>\nGreet them.\n</think>\n\nHi!<|im_end|>\n")


def test_chat_template_jinja_file_wins(tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(tokenizer_dir, name), "rb").read())
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content | tojson }}{% endfor %}{{ eos_token }}"
        "{{ strftime_now('%Y') | length }}"
    )
    text = Tokenizer.from_dir(str(tmp_path)).apply_chat_template([{"role": "user", "content": "<b>é</b>"}])
    assert text == '[user]"<b>é</b>"<|im_end|>4'  # tojson neither HTML-escapes nor ASCII-escapes


def test_tool_call_arguments_sent_back_as_json_text_render_as_the_object(tokenizer_dir, tmp_path, tok, hf_tok):
    """OpenAI clients replay a tool call with 'arguments' as a JSON string (what our server returns too). Qwen3.5's
    template iterates them with `|items`, which failed on a string ("Can only get item pairs from a mapping"), so
    every multi-turn tool conversation from an OpenAI client was a 400. They are parsed to the object first, as vLLM
    does; text that is not a JSON object stays as it is."""
    def conversation(arguments):
        return [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "21"}]

    sent = conversation('{"city":"Zürich", "days": 2}')
    assert tok.apply_chat_template(sent) == hf_tok.apply_chat_template(
        conversation({"city": "Zürich", "days": 2}), tokenize=False, add_generation_prompt=True)
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == '{"city":"Zürich", "days": 2}'  # caller's left alone
    for bad in ("not json", '{"city": "Paris"', "", None):  # as vLLM: {} (the turn still renders)
        assert '"arguments": {}}' in tok.apply_chat_template(conversation(bad))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(tokenizer_dir, name), "rb").read())
    (tmp_path / "chat_template.jinja").write_text(  # Qwen3.5's way of writing a call's parameters
        "{% for m in messages %}{% for c in m.tool_calls or [] %}{% for k, v in c.function.arguments|items %}"
        "<parameter={{ k }}>{{ v }}</parameter>{% endfor %}{% endfor %}{% endfor %}")
    text = Tokenizer.from_dir(str(tmp_path)).apply_chat_template(sent)
    assert text == "<parameter=city>Zürich</parameter><parameter=days>2</parameter>"
    for bad in ("not json", "", None):  # was "Can only get item pairs from a mapping": a 400 on the next turn
        assert Tokenizer.from_dir(str(tmp_path)).apply_chat_template(conversation(bad)) == ""


def test_raise_exception_becomes_tokenizer_error(tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(tokenizer_dir, name), "rb").read())
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('Roles must alternate.') }}")
    with pytest.raises(TokenizerError, match="Roles must alternate"):
        Tokenizer.from_dir(str(tmp_path)).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_template_that_does_not_compile_names_its_file(tokenizer_dir, tmp_path, where):
    """check_chat_template (deltaserve chat runs it at start) and a chat both name the file holding the bad template;
    the error said only "The chat template", and deltaserve chat found it at the first message, not at start."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(tokenizer_dir, name), "rb").read())
    bad = "{% for m in messages %}{{ m.content }"
    if where == "chat_template.jinja":
        (tmp_path / where).write_text(bad)
    else:
        config = json.loads((tmp_path / where).read_text())
        (tmp_path / where).write_text(json.dumps({**config, "chat_template": bad}))
    tok = Tokenizer.from_dir(str(tmp_path))
    for call in (tok.check_chat_template, lambda: tok.apply_chat_template([{"role": "user", "content": "x"}])):
        with pytest.raises(TokenizerError) as e:
            call()
        assert str(e.value).startswith(f"The chat template in {tmp_path / where} is not valid Jinja (line 1"), e.value
    tok.set_chat_template("{{ messages[0].content }}")  # a template given in code: no file to name, and it compiles
    tok.check_chat_template()


def test_missing_dir_error(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="No tokenizer.json in .*nope"):
        Tokenizer.from_dir(missing)


def test_missing_chat_template_error(tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(open(os.path.join(tokenizer_dir, "tokenizer.json"), "rb").read())
    tok = Tokenizer.from_dir(str(tmp_path))  # no tokenizer_config.json at all
    assert tok.encode("hi") and tok.eos_token_id is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_empty_conversation_error(tok):
    with pytest.raises(TokenizerError, match="empty conversation"):
        tok.apply_chat_template([])


STREAM_TEXTS = {
    "emoji": "Party time 🎉🎉 and rockets 🚀! Family: 👩‍👩‍👧.",
    "cjk": "东京タワー는 높다. 你好世界",
    "mixed": "naïve 😀 東京 ok\n<think>思考</think>done",
}


def _stream(tok, prompt_ids, ids, chunk):
    detok = IncrementalDetokenizer(tok, prompt_ids)
    pieces = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return detok, pieces


@pytest.mark.parametrize("chunk", [1, 3], ids=["one_id", "three_ids"])
@pytest.mark.parametrize("text", STREAM_TEXTS.values(), ids=STREAM_TEXTS.keys())
def test_incremental_detokenizer(tok, text, chunk):
    prompt_ids = tok.encode("<|im_start|>user\nHi 👋<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text)
    detok, pieces = _stream(tok, prompt_ids, ids, chunk)
    assert "".join(pieces) == detok.text == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    if chunk == 1:
        # multi-byte characters span several ids, so some steps must have held their bytes back
        assert pieces.count("") > 0
        assert any(len(tok.decode([i])) and tok.decode([i]).endswith("\ufffd") for i in ids)


def test_incremental_detokenizer_holds_back_split_char(tok):
    ids = tok.encode("🎉")
    assert len(ids) > 1, "the emoji should need several byte-level ids"
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.add([i]) for i in ids] == [""] * (len(ids) - 1) + ["🎉"]


@pytest.mark.parametrize("ending", ["cut_char", "real_fffd", "lone_continuation"])
def test_flush_gives_held_back_bytes_as_decode_shows_them(tok, ending):
    """A trailing U+FFFD was held back for good: a character cut off at the end, a real U+FFFD, invalid bytes."""
    ids = {"cut_char": tok.encode("ok 🎉")[:-1], "real_fffd": tok.encode("ok \ufffd"),
           "lone_continuation": tok.encode("ok") + [tok.token_to_id(_byte_token(0x80))]}[ending]
    detok = IncrementalDetokenizer(tok, [])
    streamed = "".join(detok.add([i]) for i in ids)
    assert not streamed.endswith("\ufffd")  # held back while more bytes could come
    assert streamed + detok.flush() == detok.text == tok.decode(ids) and detok.text.endswith("\ufffd")
    assert detok.flush() == ""


def test_a_length_stop_keeps_a_cut_character_as_decode_shows_it(tmp_path):
    from deltaserve import LLM, SamplingParams
    from deltaserve.tiny import make_tiny

    llm = LLM(model=make_tiny(str(tmp_path / "tiny")), device="cpu", dtype="float32")
    byte = llm.tokenizer.token_to_id(_byte_token(0xE4))  # a lead byte: never a whole character on its own
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logit_bias={byte: 100})
    out = llm.generate(["hi"], params)[0].outputs[0]
    assert out.token_ids == [byte] * 3 and out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids) == "\ufffd" * 3  # was "" (as vLLM shows it)
    assert "".join(o.outputs[0].delta_text for o in llm.generate_stream(["hi"], params)) == out.text
    # ended by a token whose text is not shown: the bytes before it stay (they came out with its text, then were cut)
    a, eos = llm.tokenizer.encode("a")[0], llm.tokenizer.token_to_id("<|im_end|>")
    for stop, extra in ((a, {"stop_token_ids": [a]}), (eos, {"skip_special_tokens": False}), (eos, {})):
        params = SamplingParams(temperature=0, max_tokens=5, min_tokens=3, logit_bias={byte: 70, stop: 100}, **extra)
        out = llm.generate(["hi"], params)[0].outputs[0]
        assert out.token_ids == [byte] * 3 + [stop] and out.finish_reason == "stop", (extra, out.token_ids)
        assert out.text == "\ufffd" * 3, (extra, out.text)
        assert "".join(o.outputs[0].delta_text for o in llm.generate_stream(["hi"], params)) == out.text


def _with_letter_and_lead_byte_token(model_dir: str) -> int:
    """Rewrite model_dir's tokenizer so that "P" + the first byte of a CJK character is one token (as real Qwen
    vocabularies merge a letter or a space with a character's first bytes): a leaf merge gives way to it. -> its id."""
    path = os.path.join(model_dir, "tokenizer.json")
    spec = json.load(open(path, encoding="utf-8"))
    model = spec["model"]
    used = {part for merge in model["merges"] for part in merge}
    merged = {a + b: k for k, (a, b) in enumerate(model["merges"])}
    leaf = next(t for t, i in sorted(model["vocab"].items(), key=lambda kv: -kv[1]) if t in merged and t not in used)
    token_id = model["vocab"].pop(leaf)
    piece = "P" + _byte_token(0xE4)
    model["vocab"][piece] = token_id
    model["merges"][merged[leaf]] = ["P", _byte_token(0xE4)]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    return token_id


@pytest.mark.parametrize("ending", ["length", "eos"])
def test_a_stop_string_in_bytes_held_back_to_the_end_still_stops(tmp_path, ending):
    """A token holding a stop string's last character and a character's first byte is held back whole; when the
    request then ends (max_tokens, EOS) the released text is checked for stop strings too (it kept "STOP")."""
    from deltaserve import LLM, SamplingParams
    from deltaserve.serve.testing import ForcedOutputRunner
    from deltaserve.tiny import make_tiny

    model_dir = make_tiny(str(tmp_path / "tiny"))
    held = _with_letter_and_lead_byte_token(model_dir)
    llm = LLM(model=model_dir, device="cpu", dtype="float32", max_model_len=128)
    tok = llm.tokenizer
    ids = tok.encode("go STOP你 ok")
    assert held in ids
    forced = ids[: ids.index(held) + 1] + ([tok.eos_token_id] if ending == "eos" else [])
    runner = ForcedOutputRunner(llm.engine.runner, tok, [{"contains": ["MARK"], "output": ""}], tok.eos_token_id)
    runner._forced = [forced]
    llm.engine.runner = runner
    params = SamplingParams(temperature=0, max_tokens=ids.index(held) + 1 + (ending == "eos"), stop=["STOP"])
    out = llm.generate(["MARK"], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == forced
    assert (out.text, out.finish_reason, out.stop_reason) == ("go ", "stop", "STOP")
    assert "".join(o.outputs[0].delta_text for o in llm.generate_stream(["MARK"], params)) == out.text


def _byte_token(b: int) -> str:
    """The byte-level BPE token of one byte (GPT-2's byte-to-unicode map)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    if b in keep:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in keep].index(b))


def test_incremental_detokenizer_prompt_cut_mid_character(tok):
    ids = tok.encode("x🚀y")
    cut = 2  # "x" + first byte(s) of the rocket end the prompt
    assert tok.decode(ids[:cut]).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok, ids[:cut])
    text = "".join(detok.add([i]) for i in ids[cut:])
    assert text == tok.decode(ids[cut:])


def test_incremental_detokenizer_skips_special_tokens(tok):
    ids = tok.encode("Hi 😀<|im_end|>")
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "".join(detok.add([i]) for i in ids) == "Hi 😀"
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(detok.add([i]) for i in ids) == "Hi 😀<|im_end|>"


@pytest.mark.parametrize("message, needle", [
    ({"content": "hi"}, "needs a 'role'"),
    ({"role": "wizard", "content": "hi"}, "'wizard'"),
    ({"role": "user", "content": None}, "'content' must be a string"),
    ({"role": "user", "content": 5}, "'content' must be a string"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     r"messages\[0\] has a 'image_url' content part, but this model is text-only"),
], ids=["no-role", "unknown-role", "no-content", "int-content", "image-part"])
def test_messages_the_template_would_drop_are_refused(tok, message, needle):
    """A message the template would silently leave out (or render empty) is an error, not a shorter prompt."""
    with pytest.raises(TokenizerError, match=needle):
        tok.apply_chat_template([message])


def test_text_parts_and_developer_role_render_as_plain_messages(tok):
    """The tiny template reads a message's content as one string: its parts are joined with "\n", as vLLM joins
    them for such a template."""
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]
    as_given = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello\nthere"}]
    assert tok.apply_chat_template(as_given) == tok.apply_chat_template(plain)


# chat templates that render a message's content parts themselves (vLLM's "openai" content format)
LOOPS_OVER_MESSAGE_CONTENT = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}")
LOOPS_IN_A_MACRO = (  # as Qwen3.5's template, whose render_content macro loops over its `content` argument
    "{% macro render_content(content) %}{% if content is string %}{{ content }}{% else %}{% for item in content %}"
    "{{ item.text }}{% endfor %}{% endif %}{% endmacro %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ render_content(m.content) }}<|im_end|>\n{% endfor %}")

CONTENT_FORMATS = {  # id: (chat_template (None: the tiny tokenizer's own), a message's parts "a", "b" render as)
    # reads message.content as a string (vLLM's "string" format): vLLM joins the parts with "\n" first
    "template-reads-a-string": (None, "a\nb"),
    # loops over the parts (vLLM's "openai" format: the parts are the template's to render)
    "template-loops-over-message-content": (LOOPS_OVER_MESSAGE_CONTENT, "ab"),
    "template-loops-in-a-macro-as-qwen3.5": (LOOPS_IN_A_MACRO, "ab"),
}


@pytest.mark.parametrize("role", ["system", "user", "assistant", "tool"])
@pytest.mark.parametrize("template, joined", CONTENT_FORMATS.values(), ids=CONTENT_FORMATS.keys())
def test_text_parts_render_as_vllm_renders_them_for_the_templates_content_format(tok, hf_tok, template, joined,
                                                                                    role):
    """vLLM renders a message's text parts by the chat template's content format: for a template that reads the
    content as a string, joined with "\n"; a template that loops over the parts (Qwen3.5's does) renders them
    itself, back to back here, as transformers renders the parts given to it. A tool result's parts are lines in
    both. deltaserve joined every non-tool message's parts with "" ("ab" where vLLM has "a\nb")."""
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    if role == "tool":
        joined = "a\nb"

    def chat(content):
        return [{"role": "user", "content": "Q"}, {"role": role, "content": content}]
    kwargs = dict(add_generation_prompt=False, chat_template=template)
    assert tok.apply_chat_template(chat(parts), **kwargs) == tok.apply_chat_template(chat(joined), **kwargs)
    if template is not None and role != "tool":  # transformers hands the parts themselves to the template
        ours = tok.apply_chat_template(chat(parts), **kwargs)
        assert ours == hf_tok.apply_chat_template(chat(parts), tokenize=False, **kwargs)


@pytest.mark.parametrize("name, text, needle", [
    ("tokenizer.json", "{bad json", "tokenizer.json is not a valid tokenizer file"),
    ("tokenizer_config.json", "{bad", "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", "[1, 2]", "must hold a JSON object"),
], ids=["tokenizer-json", "config-json", "config-not-object"])
def test_broken_tokenizer_files_are_one_sentence(tokenizer_dir, tmp_path, name, text, needle):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes(open(os.path.join(tokenizer_dir, f), "rb").read())
    (tmp_path / name).write_text(text)
    with pytest.raises(TokenizerError, match=needle) as e:
        Tokenizer.from_dir(str(tmp_path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
def test_unreadable_tokenizer_files_are_one_sentence(tokenizer_dir, tmp_path, monkeypatch, name):
    """Mode 000: tokenizer.json was "not a valid tokenizer file", the other two a PermissionError's trace."""
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes(open(os.path.join(tokenizer_dir, f), "rb").read())
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    make_unreadable(str(tmp_path / name), monkeypatch)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(str(tmp_path))
    assert str(e.value) == f"{tmp_path / name} cannot be read (Permission denied)."


def test_text_with_a_lone_surrogate_is_one_clear_error(tok):
    """Python decodes bytes that are not UTF-8 (stdin, argv) to lone surrogates; the backend raised a bare
    TypeError for them, a traceback in `deltaserve generate` / `chat`."""
    from deltaserve.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="not valid Unicode: it holds the lone surrogate U\\+DCE9"):
        tok.encode("caf\udce9")
    assert tok.encode("café") == tok.encode("caf" + "\u00e9")


@pytest.mark.parametrize("reasoning", [None, "Let me think"], ids=["no-reasoning", "prefilled-reasoning"])
@pytest.mark.parametrize("final", ["", " "], ids=["empty", "space"])
def test_continue_final_message_with_empty_content_matches_hf(tok, hf_tok, final, reasoning):
    """An assistant message with empty content (e.g. only its reasoning prefilled, for the model to write the answer)
    is continued as HF (and so vLLM) continues it: right after the think block. It was refused ("needs a last message
    with text to continue"); only a message without content has nothing to continue, as in HF."""
    last = {"role": "assistant", "content": final, **({"reasoning_content": reasoning} if reasoning else {})}
    msgs = [{"role": "user", "content": "Q"}, last]
    kwargs = dict(add_generation_prompt=False, continue_final_message=True)
    assert tok.apply_chat_template(msgs, **kwargs) == hf_tok.apply_chat_template(msgs, tokenize=False, **kwargs)
    with pytest.raises(TokenizerError, match="no content to continue"):
        tok.apply_chat_template([msgs[0], {"role": "assistant", "reasoning_content": "r"}], **kwargs)


@pytest.mark.parametrize("final", ['{"name": ', "Sure, the answer", "  padded  ", "two\n\n"])
def test_continue_final_message_under_a_trimming_template_matches_hf(tok, hf_tok, final):
    """Qwen3.5's template writes each message's content `|trim`med: HF (and so vLLM) then ends the continued prompt
    after the trimmed text, without the prefill's trailing whitespace, which the template drops too."""
    trimming = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content|trim + '<|im_end|>\\n' }}"
                "{% endfor %}")
    msgs = [{"role": "user", "content": "Give JSON"}, {"role": "assistant", "content": final}]
    kwargs = dict(add_generation_prompt=False, continue_final_message=True, chat_template=trimming)
    assert tok.apply_chat_template(msgs, **kwargs) == hf_tok.apply_chat_template(msgs, tokenize=False, **kwargs)


def test_tool_result_text_parts_join_as_lines_like_vllm(tok):
    """Claude Code / Cursor send a tool result as text parts; vLLM joins a tool message's parts with "\\n" (they ran
    together: "total 8-rw-r--r-- a.txt")."""
    def conversation(content):
        return [{"role": "user", "content": "ls"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "sh", "arguments": {"cmd": "ls"}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": content}]
    parts = [{"type": "text", "text": "total 8"}, {"type": "text", "text": "-rw-r--r-- a.txt"}]
    assert tok.apply_chat_template(conversation(parts)) == tok.apply_chat_template(
        conversation("total 8\n-rw-r--r-- a.txt"))


@pytest.mark.parametrize("template", [None, LOOPS_IN_A_MACRO], ids=["template-reads-a-string", "qwen3.5-macro"])
def test_content_format_string_and_openai_are_vllms(tok, template):
    """vLLM's chat_template_content_format, whatever the template reads: "string" joins the text parts (a plain
    string is one, an empty one is dropped) with "\n"; "openai" hands them to the template as a list of text parts,
    a string content too (a template that reads only strings then renders the content empty, as under vLLM)."""
    parts = [{"type": "text", "text": "a"}, "b", {"type": "text", "text": ""}, {"type": "input_text", "text": "c"}]

    def render(content, fmt="auto"):
        return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=False,
                                       chat_template=template, chat_template_content_format=fmt)
    assert render(parts, "string") == render("a\nb\nc")
    assert render(parts, "openai") == render("abc" if template else "")
    assert render("abc", "openai") == render("abc" if template else "")
    with pytest.raises(TokenizerError, match="^chat_template_content_format must be 'auto', 'string' or 'openai'"):
        render("abc", "list")


def test_continue_final_message_under_the_openai_content_format_matches_hf(tok, hf_tok):
    """Under "openai" the last message's content is a list: it is continued after its last text part, as HF (which
    vLLM calls with the parts) continues it. The template marks where each part ends, so a joined content (what
    "auto" and "string" give it) would show."""
    marks_parts = LOOPS_IN_A_MACRO.replace("{{ item.text }}", "{{ item.text }}|")
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Q"}]},  # parts: "openai" makes a string one
            {"role": "assistant", "content": [{"type": "text", "text": "The answer"}, {"type": "text", "text": "is"}]}]
    kwargs = dict(add_generation_prompt=False, continue_final_message=True, chat_template=marks_parts)
    ours = tok.apply_chat_template(msgs, chat_template_content_format="openai", **kwargs)
    assert ours == hf_tok.apply_chat_template(msgs, tokenize=False, **kwargs)
    assert ours.endswith("The answer|is")


@pytest.mark.parametrize("template, joined", CONTENT_FORMATS.values(), ids=CONTENT_FORMATS.keys())
def test_server_renders_text_parts_as_the_tokenizer_does(tok, template, joined):
    """The server joined the parts itself, with "" (tool results "\n") whatever the template: now the tokenizer
    does, by the template's content format. A text part without text is left out, as vLLM skips it."""
    from types import SimpleNamespace

    from deltaserve.serve.protocol import ChatCompletionRequest
    from deltaserve.serve.serving_chat import chat_prompt
    parts = [{"type": "text", "text": "a"}, {"type": "text"}, {"type": "text", "text": "b"}]
    ctx = SimpleNamespace(tokenizer=tok, trust_request_chat_template=True)

    def prompt(content, tool):
        return chat_prompt(ctx, ChatCompletionRequest(model="m", chat_template=template, messages=[
            {"role": "user", "content": content}, {"role": "tool", "tool_call_id": "c1", "content": tool}]))
    assert prompt(parts, parts) == prompt(joined, "a\nb")


def test_generation_blocks_render_their_body_like_hf(tok, hf_tok):
    """Templates written for assistant-token masks wrap the assistant's text in transformers' `{% generation %}` tag;
    transformers renders the body as it is, ours refused to compile the template."""
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
                "{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n"
                "{% endfor %}")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    kwargs = dict(add_generation_prompt=False, chat_template=template)
    assert tok.apply_chat_template(msgs, **kwargs) == hf_tok.apply_chat_template(msgs, tokenize=False, **kwargs)


def _ours_and_hf_with_config(tokenizer_dir, tmp_path, edit):
    """The tiny tokenizer copied with its tokenizer_config.json changed by edit(config) -> (ours, transformers')."""
    transformers = pytest.importorskip("transformers")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes(open(os.path.join(tokenizer_dir, f), "rb").read())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    edit(config)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))


def test_added_token_only_in_the_config_keeps_its_flags(tokenizer_dir, tmp_path, hf_tok):
    """A token tokenizer_config.json lists but tokenizer.json lacks was added with every flag off: lstrip / rstrip
    left the space beside it a token of its own, and a normalized token did not match its NFD spelling, where
    transformers (which builds it from the config entry) gives one id."""
    n = len(hf_tok)
    off = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": False}
    ours, ref = _ours_and_hf_with_config(tokenizer_dir, tmp_path, lambda config: config["added_tokens_decoder"].update({
        str(n): {**off, "content": "<|mask|>", "lstrip": True, "special": True},
        str(n + 1): {**off, "content": "<|sep|>", "rstrip": True},
        str(n + 2): {**off, "content": "Café", "normalized": True},
    }))
    for text in ("a <|mask|> b", "x<|sep|>  y", "Cafe\u0301 and Café"):
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert ours.encode("a <|mask|>")[-1] == n and len(ours.encode("Cafe\u0301")) == 1
    ids = ref.encode("a <|mask|> Café", add_special_tokens=False)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_split_special_tokens_from_the_config(tokenizer_dir, tmp_path):
    """tokenizer_config.json's split_special_tokens=true: transformers encodes `<|im_start|>` written in the text as
    text; it was ignored, so the text still became the special ids."""
    ours, ref = _ours_and_hf_with_config(tokenizer_dir, tmp_path, lambda config: config.update(split_special_tokens=True))
    text = "<|im_start|>user\nhi <think>x</think><|im_end|>"
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    assert ours.token_to_id("<|im_start|>") not in ours.encode(text)


@pytest.mark.parametrize("field, value", [
    ("eos_token", 514),
    ("pad_token", {"id": 512}),
    ("added_tokens_decoder", [1, 2]),
    ("added_tokens_decoder", {"600": {"special": True}}),
    ("added_tokens_decoder", {"600": "<x>"}),
    ("added_tokens_decoder", {"abc": {"content": "<x>"}}),
    ("chat_template", [{"template": "x"}]),
    ("chat_template", 5),
], ids=["eos-int", "pad-no-content", "added-list", "added-no-content", "added-str", "added-key", "template-no-name",
        "template-int"])
def test_tokenizer_config_field_of_the_wrong_shape_is_one_sentence(tokenizer_dir, tmp_path, field, value):
    """A hand-edited tokenizer_config.json field of another shape was a KeyError / TypeError / AttributeError trace
    (at load, or at the first chat for chat_template)."""
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes(open(os.path.join(tokenizer_dir, f), "rb").read())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config[field] = value
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(str(tmp_path))
    assert "\n" not in str(e.value) and "tokenizer_config.json" in str(e.value) and field in str(e.value)


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(split_special_tokens="false"), "split_special_tokens"),
    (lambda c: c.update(split_special_tokens=1), "split_special_tokens"),
    (lambda c: c.update(split_special_tokens=None), "split_special_tokens"),
    (lambda c: c["added_tokens_decoder"]["513"].update(special="false"), "added_tokens_decoder['513'].special"),
    (lambda c: c["added_tokens_decoder"].update({"521": {"content": "<|mask|>", "lstrip": "false"}}),
     "added_tokens_decoder['521'].lstrip"),
    (lambda c: c["added_tokens_decoder"].update({"521": {"content": "<|mask|>", "normalized": 0}}),
     "added_tokens_decoder['521'].normalized"),
], ids=["split-str", "split-int", "split-null", "special-str", "lstrip-str", "normalized-int"])
def test_tokenizer_config_flag_that_is_not_a_json_bool_is_one_sentence(tokenizer_dir, tmp_path, edit, field):
    """A flag written "false" (or 0 / 1 / null) went through bool(): split_special_tokens "false" split the special
    tokens, a "false" lstrip stripped; transformers refuses to load such a file (TypeError: not an instance of bool)."""
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes(open(os.path.join(tokenizer_dir, f), "rb").read())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    edit(config)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / 'tokenizer_config.json'}: '{field}' must be true or false, got ")
    assert "\n" not in str(e.value)


def test_chat_template_file_not_utf8_is_named(tokenizer_dir, tmp_path):
    """A chat_template.jinja saved as Latin-1 was a bare UnicodeDecodeError naming no file."""
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes(open(os.path.join(tokenizer_dir, f), "rb").read())
    (tmp_path / "chat_template.jinja").write_bytes("caf\xe9 {{ messages[0].content }}".encode("latin-1"))
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(str(tmp_path))
    assert "\n" not in str(e.value) and "chat_template.jinja is not UTF-8" in str(e.value)


# words whose combining mark (a tilde, an Arabic fatha) Qwen2's split cuts off, so the 't / tt merges come out apart
MARKED = {"tilde": "\".\u0303'te,:k", "fatha": "'k\u064e'tt(", "hindi": "नमस्ते दुनिया", "thai": "สวัสดีครับ"}


@pytest.mark.parametrize("config, tokenizer_class", [({"model_type": "qwen3_5"}, None),
                                                     ({"model_type": "qwen3_5_moe"}, "TokenizersBackend"),
                                                     (None, "Qwen3_5Tokenizer")],
                         ids=["qwen3_5-checkpoint", "moe-checkpoint", "qwen3_5-tokenizer-class"])
def test_qwen35_checkpoint_splits_words_with_marks_as_transformers(tokenizer_dir, tmp_path, config, tokenizer_class):
    """transformers loads a Qwen3.5 checkpoint's tokenizer as Qwen3_5Tokenizer, which rebuilds the pre-tokenizer with
    Qwen3.5's split (combining marks belong to words) whatever tokenizer.json holds; a tokenizer.json re-saved by
    transformers 5 (and make-tiny's) holds Qwen2's, which cut words at each mark: other ids than HF's and vLLM's."""
    transformers = pytest.importorskip("transformers")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(tokenizer_dir, name), "rb").read())
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if tokenizer_class is not None:
        cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": tokenizer_class}))
    ours, hf = Tokenizer.from_dir(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(hf).__name__ == "Qwen3_5Tokenizer"
    for text in MARKED.values():
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf.decode(ids) == text


def test_a_tokenizer_without_qwen35_config_keeps_its_own_split(tok, hf_tok):
    """Without a Qwen3.5 config.json (a bare tokenizer folder naming Qwen2Tokenizer), tokenizer.json's split stays."""
    assert type(hf_tok).__name__ == "Qwen2Tokenizer"
    for text in MARKED.values():
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize("added", [{}, {"<|mask|>": True, "<|sep|>": False}], ids=["as-trained", "config-only-tokens"])
def test_len_is_the_whole_vocabulary_as_in_transformers(tokenizer_dir, tmp_path, added):
    """len(tokenizer) is transformers' (and vLLM's) size of the whole vocabulary, added tokens included; it was a
    TypeError. config-only-tokens: tokens tokenizer_config.json adds that tokenizer.json lacks count too."""
    def add(config):
        n = max(int(i) for i in config["added_tokens_decoder"]) + 1
        off = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
        for i, (content, special) in enumerate(added.items()):
            config["added_tokens_decoder"][str(n + i)] = {**off, "content": content, "special": special}

    ours, hf = _ours_and_hf_with_config(tokenizer_dir, tmp_path, add)
    assert len(ours) == len(hf) == ours.vocab_size
    assert len(ours) == 512 + 9 + len(added)  # base + 3 special + 6 chat tokens + the config's own
