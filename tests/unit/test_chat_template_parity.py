"""Chat prompts as HF transformers renders them: `Tokenizer.apply_chat_template` (what LLM.chat calls) and the
server's /v1/chat/completions rendering (`chat_prompt`, from the JSON a client sends) against
`AutoTokenizer.apply_chat_template(..., tokenize=False)` on the tiny checkpoint's own template, text and token ids.
Cases test_tokenizer.py leaves out: vLLM's `reasoning` field, reasoning kept across a multi-step tool turn,
enable_thinking both ways, parallel calls beside text, special-token text inside a message, continuing a message."""
import copy
import json
from types import SimpleNamespace

import pytest

transformers = pytest.importorskip("transformers")

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "now", "description": 'Local time <tz> & "offset"', "parameters": {"type": "object",
                                                                               "properties": {}}}},
]


def _call(args, call_id="c1", name="get_weather"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text, **fields):
    return {"role": "assistant", "content": text, **fields}


def _tool(text, call_id="c1"):
    return {"role": "tool", "tool_call_id": call_id, "content": text}


# id: (messages, apply_chat_template kwargs besides tokenize; add_generation_prompt defaults to True)
CASES = {
    # vLLM's name for an assistant turn's reasoning: HF's chat_template_utils aliases it to reasoning_content
    "vllm-reasoning-field": ([_user("2+2?"), _assistant("4", reasoning="Add."), _user("3+3?"),
                              _assistant("6", reasoning="Add again.")], {"add_generation_prompt": False}),
    "thinking-field": ([_user("q"), _assistant("a", thinking="T")], {"add_generation_prompt": False}),
    "reasoning-field-precedence": ([_user("q"), _assistant("a", reasoning_content="RC", reasoning="R")],
                                   {"add_generation_prompt": False}),
    "enable-thinking-true": ([_user("hi")], {"enable_thinking": True}),
    "enable-thinking-false-history": ([_user("hi"), _assistant("yo", reasoning_content="Greet."), _user("again")],
                                      {"enable_thinking": False}),
    # reasoning of the turns after the last real user query is kept, through tool results
    "multi-step-tool-reasoning": ([_user("Weather in Zürich?"),
                                  _assistant("", reasoning_content="Look it up.",
                                             tool_calls=[_call({"city": "Zürich"})]),
                                  _tool("21"), _assistant("21 °C.", reasoning_content="Got it.")],
                                 {"tools": TOOLS, "add_generation_prompt": False}),
    "parallel-calls-beside-text": ([{"role": "system", "content": "Use tools."}, _user("w?"),
                                   _assistant("Checking both.", tool_calls=[
                                       _call({"city": "Bern", "days": 2}),
                                       _call({"a": [1, 2.5, None, True], "b": {"x": "é<>&"}}, "c2", "now")]),
                                   _tool("19"), _tool(""), _tool('{"t": "12:00"}', "c2"), _user("thanks")],
                                  {"tools": TOOLS}),
    # combining marks (NFD), Devanagari, Thai, compatibility forms, astral plane, NUL: the NFC normalizer and split
    "unicode-normalization": ([_user("cafe\u0301 नमस्ते สวัสดี \u212b ﬁ 𝔘 \x00"), _assistant("e\u0301 🎉")],
                              {"add_generation_prompt": False}),
    "special-token-text-in-content": ([_user("say <|im_end|> then <think>x</think> <|endoftext|>")], {}),
    "empty-and-whitespace-content": ([{"role": "system", "content": ""}, _user("  q\n\n"),
                                     _assistant("\n\n a \n", reasoning_content="\n r \n"), _user("")], {}),
    "template-variable-overrides": ([_user("q")], {"eos_token": "X", "custom_flag": "on"}),
}


def _hf(hf_tok, messages, kwargs, tokenize=False):
    kwargs = {"add_generation_prompt": True, **kwargs}
    extra = {"return_dict": False} if tokenize else {}
    return hf_tok.apply_chat_template(copy.deepcopy(messages), tokenize=tokenize, **extra, **kwargs)


@pytest.mark.parametrize("messages, kwargs", CASES.values(), ids=CASES.keys())
def test_prompt_text_and_ids_match_hf(tok, hf_tok, messages, kwargs):
    ref = _hf(hf_tok, messages, kwargs)
    ours = tok.apply_chat_template(copy.deepcopy(messages), **{"add_generation_prompt": True, **kwargs})
    assert ours == ref
    assert tok.encode(ours) == _hf(hf_tok, messages, kwargs, tokenize=True)


def _server_prompt(tok, messages, kwargs):
    pytest.importorskip("pydantic")
    from deltaserve.serve.protocol import ChatCompletionRequest
    from deltaserve.serve.serving_chat import chat_prompt
    body = {"model": "m", "messages": json.loads(json.dumps(messages))}  # as it arrives: JSON
    fields = {"tools", "add_generation_prompt", "continue_final_message"}
    body.update({k: v for k, v in kwargs.items() if k in fields})
    template_kwargs = {k: v for k, v in kwargs.items() if k not in fields}
    if template_kwargs:
        body["chat_template_kwargs"] = template_kwargs
    return chat_prompt(SimpleNamespace(tokenizer=tok, trust_request_chat_template=False),
                       ChatCompletionRequest.model_validate(body))


@pytest.mark.parametrize("messages, kwargs", CASES.values(), ids=CASES.keys())
def test_server_prompt_matches_hf(tok, hf_tok, messages, kwargs):
    """/v1/chat/completions: the request's fields (reasoning under vLLM's name rides on the message's extras,
    enable_thinking in chat_template_kwargs) reach the template as HF's apply_chat_template gets them."""
    assert _server_prompt(tok, messages, kwargs) == _hf(hf_tok, messages, kwargs)


def test_tool_call_arguments_as_json_text_render_as_hf_renders_the_object(tok, hf_tok):
    """What an OpenAI client sends back (arguments as JSON text, several results in a row), through LLM.chat's and
    the server's path, renders as HF renders the same calls with the arguments as objects."""
    def chat(arguments):
        return [_user("w?"), _assistant(None, reasoning="Two cities.", tool_calls=[
            _call(arguments[0]), _call(arguments[1], "c2")]), _tool("21"), _tool("19", "c2")]
    sent = chat(['{"city":"Zürich"}', '{"city": "Bern", "days": 2}'])
    ref = _hf(hf_tok, chat([{"city": "Zürich"}, {"city": "Bern", "days": 2}]), {"tools": TOOLS})
    assert tok.apply_chat_template(copy.deepcopy(sent), tools=TOOLS) == ref
    assert _server_prompt(tok, sent, {"tools": TOOLS}) == ref


CONTINUED = {
    "unicode": [_user("q"), _assistant("日本語 🎉")],
    "ends-in-newline": [_user("q"), _assistant("line\n")],
    "same-text-earlier": [_user("ok"), _assistant("ok")],
    "after-reasoning": [_user("q"), _assistant("The ans", reasoning="r")],
    "user-message": [_user("Complete: the cat")],
}


@pytest.mark.parametrize("messages", CONTINUED.values(), ids=CONTINUED.keys())
def test_continue_final_message_matches_hf(tok, hf_tok, messages):
    kwargs = {"add_generation_prompt": False, "continue_final_message": True}
    ref = _hf(hf_tok, messages, kwargs)
    assert tok.apply_chat_template(copy.deepcopy(messages), **kwargs) == ref
    assert _server_prompt(tok, messages, kwargs) == ref
    assert tok.encode(ref) == _hf(hf_tok, messages, kwargs, tokenize=True)
