"""Reasoning and tool-call parsers (deltaserve/serve): the same split whatever way the text is cut into deltas."""
import json
import random

import pytest

from deltaserve.serve.reasoning import ReasoningParser, prompt_opens_thinking
from deltaserve.serve.tool_parser import ToolCallParser, convert_value

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "hours": {"type": "array"}, "zip": {"type": "string"}}}}}]


def cuts(text: str, seed: int) -> list[str]:
    """text cut into pieces: whole, char by char, and random lengths."""
    if seed == 0:
        return [text]
    if seed == 1:
        return list(text)
    rng, out, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        out.append(text[i:i + n])
        i += n
    return out


def run_reasoning(pieces, **kw):
    p, reasoning, content = ReasoningParser(**kw), "", ""
    for piece in pieces:
        s = p.feed(piece)
        reasoning, content = reasoning + s.reasoning, content + s.content
    s = p.finish()
    return reasoning + s.reasoning, content + s.content


def run_tools(pieces, tools=TOOLS):
    """-> (content, [(name, arguments)] from the deltas, same from parser.calls, number of deltas per call)."""
    p, content, calls, deltas = ToolCallParser(tools), "", {}, {}
    for piece in pieces + [None]:
        d = p.finish() if piece is None else p.feed(piece)
        content += d.content
        for tc in d.tool_calls:
            if tc.id is not None:
                calls[tc.index] = [tc.name, ""]
                assert tc.to_openai()["type"] == "function"
            calls[tc.index][1] += tc.arguments
            deltas[tc.index] = deltas.get(tc.index, 0) + 1
    streamed = [tuple(calls[i]) for i in sorted(calls)]
    return content, streamed, [(c.name, c.arguments) for c in p.calls], deltas


REASONING_CASES = {
    "tags_in_output": ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", {},
                       ("Let me think.", "The answer is 4.")),
    "prompt_opened": ("Let me think.\n</think>\n\nFour.", {"in_reasoning": True}, ("Let me think.", "Four.")),
    "prompt_opened_repeats_tag": ("<think>\nhmm</think>Four.", {"in_reasoning": True}, ("hmm", "Four.")),
    # one repeat of the opening tag is dropped, a second is reasoning text, however the text is cut into deltas
    "prompt_opened_repeats_tag_twice": ("<think><think>y</think>z", {"in_reasoning": True}, ("<think>y", "z")),
    "opened_then_repeated": ("<think><think>y</think>z", {}, ("<think>y", "z")),
    "no_tags": ("An answer with </think> inside? no: <b>", {}, ("", "An answer with </think> inside? no: <b>")),
    "disabled": ("<think>\nx\n</think>\n\ny", {"enabled": False}, ("", "<think>\nx\n</think>\n\ny")),
    "truncated_in_thinking": ("<think>\nstill going \n\n", {}, ("still going", "")),
    "leading_whitespace_answer": ("\n\nHi <", {}, ("", "\n\nHi <")),
    "partial_tag_is_content": ("<thin", {}, ("", "<thin")),
    "end_tag_lookalike": ("<think>a </thin b</think>c", {}, ("a </thin b", "c")),
    # a structured-output answer is exactly the grammar's text: regex "  [0-9]{3}" came back as "360"
    "constrained_answer_keeps_its_whitespace": ("hmm\n</think>  360", {"in_reasoning": True, "exact_content": True},
                                                ("hmm", "  360")),
}


@pytest.mark.parametrize("seed", [0, 1, 2, 3], ids=["whole", "chars", "rand2", "rand3"])
@pytest.mark.parametrize("case", list(REASONING_CASES), ids=list(REASONING_CASES))
def test_reasoning_split(case, seed):
    text, kw, expected = REASONING_CASES[case]
    assert run_reasoning(cuts(text, seed), **kw) == expected


def test_prompt_opens_thinking():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")
    # a <think> quoted in an earlier message opens nothing; a raw prompt without turns counts whole
    assert not prompt_opens_thinking("<|im_start|>user\nWhat does <think> do?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_opens_thinking("Reason first. <think>")


XML_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
            "</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n"
            "<parameter=zip>\n007\n</parameter>\n</function>\n</tool_call>")
XML_ARGS = {"city": "Paris", "days": 3, "metric": True, "hours": [1, 2], "zip": "007"}
JSON_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "nested": {"a": "}"}}}\n</tool_call>'
JSON_ARGS = {"city": "Paris", "nested": {"a": "}"}}

TOOL_CASES = {
    "xml": (XML_CALL, "", [("get_weather", XML_ARGS)]),
    "json": (JSON_CALL, "", [("get_weather", JSON_ARGS)]),
    "content_then_two_calls": ("Let me check.\n\n" + XML_CALL + "\n" + JSON_CALL + "\n", "Let me check.",
                               [("get_weather", XML_ARGS), ("get_weather", JSON_ARGS)]),
    "xml_no_params": ("<tool_call>\n<function=now>\n</function>\n</tool_call>", "", [("now", {})]),
    "json_string_arguments": ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', "",
                              [("f", {"x": 1})]),
    "json_other_key_order": ('<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>', "", [("f", {"x": 1})]),
    "not_a_call": ("a <tool_call>oops</tool_call> b", "a <tool_call>oops</tool_call> b", []),
    "plain_text": ("Hello <tool world \n", "Hello <tool world \n", []),
    "truncated_xml": ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n<parameter=da",
                      "", [("get_weather", {"city": "Rome"})]),
    # a model that leaves out </parameter>: the value ends at the next parameter or </function> (it was dropped)
    "xml_unclosed_parameters": ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n3\n"
                                "</function>\n</tool_call>", "", [("get_weather", {"city": "Paris", "days": 3})]),
    # content on both sides of a call keeps the whitespace that separated them (it was glued into one word)
    "content_around_call": ("Let me check that.\n\n" + XML_CALL + "\nAnd more text.",
                            "Let me check that.\n\nAnd more text.", [("get_weather", XML_ARGS)]),
    "content_gap_after_call": ("Done." + XML_CALL + "\n\nNext", "Done.\n\nNext", [("get_weather", XML_ARGS)]),
    "content_gap_two_calls": ("A\n\n" + XML_CALL + JSON_CALL + "B", "A\n\nB",
                              [("get_weather", XML_ARGS), ("get_weather", JSON_ARGS)]),
    # a closed value may quote a tag of itself or of a parameter already read: it does not end the value
    "xml_value_quotes_a_tag": ("<tool_call>\n<function=get_weather>\n<parameter=zip>\n007\n</parameter>\n"
                               "<parameter=city>\nsay <parameter=zip> or <parameter=city> here\n</parameter>\n"
                               "</function>\n</tool_call>", "",
                               [("get_weather", {"zip": "007",
                                                 "city": "say <parameter=zip> or <parameter=city> here"})]),
    # nor does a tag of a parameter still to come, mentioned inside a line (only one starting a line can end a value
    # whose </parameter> the model left out, as in vLLM): the value was cut there and "days" came twice
    "xml_value_mentions_a_later_parameter": ("<tool_call>\n<function=get_weather>\n<parameter=city>\nsay "
                                             "<parameter=days> here\n</parameter>\n<parameter=days>\n2\n</parameter>\n"
                                             "</function>\n</tool_call>", "",
                                             [("get_weather", {"city": "say <parameter=days> here", "days": 2})]),
    # code in a value may quote "</parameter>": only one followed by a tag (or the block's end) ends the value, as in
    # vLLM's Qwen3-Coder parser (the value was cut there and the rest of it dropped)
    "xml_value_quotes_its_closing_tag": ("<tool_call>\n<function=get_weather>\n<parameter=city>\nEND = "
                                         "'</parameter>'\nprint(END)</parameter>\nx\n</parameter>\n<parameter=days>"
                                         "\n2\n</parameter>\n</function>\n</tool_call>", "",
                                         [("get_weather", {"city": "END = '</parameter>'\nprint(END)</parameter>\nx",
                                                           "days": 2})]),
}


@pytest.mark.parametrize("seed", [0, 1, 2, 3], ids=["whole", "chars", "rand2", "rand3"])
@pytest.mark.parametrize("case", list(TOOL_CASES), ids=list(TOOL_CASES))
def test_tool_calls(case, seed):
    text, content, expected = TOOL_CASES[case]
    got_content, streamed, final, _ = run_tools(cuts(text, seed))
    assert got_content == content
    assert streamed == final  # the deltas add up to the final calls
    assert [(name, json.loads(args)) for name, args in final] == expected


def test_xml_arguments_stream_per_parameter():
    _, _, _, deltas = run_tools(list(XML_CALL))
    assert deltas[0] >= 1 + len(XML_ARGS)  # the name, then at least one delta per parameter


def test_json_arguments_stream_before_block_ends():
    p = ToolCallParser(TOOLS)
    d = p.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    assert [tc.name for tc in d.tool_calls if tc.id] == ["get_weather"]
    assert "".join(tc.arguments for tc in d.tool_calls) == '{"city": "Par'


@pytest.mark.parametrize("value, type_, expected", [
    ("42", "integer", 42), ("4.5", "number", 4.5), ("4", "number", 4), ("False", "boolean", False),
    ('{"a": 1}', "object", {"a": 1}), ("null", ["integer", "null"], None), ("x1", "integer", "x1"),
    ("42", "string", "42"), ("42", None, "42"), ("9007199254740993", "number", 9007199254740993),
    ("1e999", "number", "1e999"), ("NaN", "object", "NaN"), ("1_000", "integer", "1_000"),
    ('{"x": 1e999}', "object", '{"x": 1e999}'), ("[1, -1e999]", "array", "[1, -1e999]"),
    ("{'a': True, 'b': None, 'c': (1, 2)}", "object", {"a": True, "b": None, "c": [1, 2]}),
    ("['x', 'y']", "array", ["x", "y"]), ("{1, 2}", "array", "{1, 2}"), ("[1e999]", "array", "[1e999]"),
    ("'abc'", "object", "'abc'"), ("[" + "-" * 10000 + "1]", "array", "[" + "-" * 10000 + "1]")],
    ids=["int", "float", "number_int", "bool", "object", "nullable", "bad_int", "string", "untyped", "big_int_exact",
         "inf_kept_as_text", "nan_kept_as_text", "underscore_int_is_text", "inf_in_object_kept_as_text",
         "inf_in_array_kept_as_text", "python_dict", "python_list", "python_set_is_text", "python_inf_is_text",
         "python_str_is_no_object", "python_too_deep_is_text"])
def test_convert_value(value, type_, expected):
    """Whatever comes back must be writable as JSON (no Infinity / NaN) and integers stay exact. An object or array
    the model wrote as a Python literal (single quotes, True, None) is read as vLLM's Qwen3-Coder parser reads it
    (ast.literal_eval; it came back as a string)."""
    assert convert_value(value, type_) == expected
    json.dumps(convert_value(value, type_), allow_nan=False)


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "a\\x", "arguments": {}}\n</tool_call>',  # a bad escape in the name
    '<tool_call>\n{"name": "f", "arguments": {"a": ' + "[" * 1000 + "]" * 1000 + '}}\n</tool_call>',  # deep nesting
    "<tool_call>\n<function=f>\n<parameter=o>\n" + "[" * 1000 + "]" * 1000
    + "\n</parameter>\n</function>\n</tool_call>",
], ids=["bad-escape-name", "deep-json", "deep-xml-object"])
def test_model_text_never_raises(text):
    """Whatever the model writes, the parser answers (a call or text), streamed whole or character by character."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"o": {"type": "object"}}}}}]
    for pieces in ([text], list(text)):
        p = ToolCallParser(tools)
        for piece in pieces:
            p.feed(piece)
        p.finish()


@pytest.mark.parametrize("text, arguments", [
    ("<tool_call>\n<function=f>\n<parameter=o>\n<p>x</p></function>\n</parameter>\n</function>\n</tool_call>",
     '{"o": "<p>x</p></function>"}'),  # code or HTML that mentions the closing tag
    ("<tool_call>\n<function=f>\n<parameter=o>\n1\n</parameter>\n</function>x<parameter=b>\n2\n</parameter>\n"
     "</tool_call>", '{"o": "1"}'),  # a parameter after the function ended is not part of it
], ids=["closing-tag-in-value", "parameter-after-end"])
def test_xml_function_end_same_streamed_or_whole(text, arguments):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    for pieces in ([text], list(text)):
        p = ToolCallParser(tools)
        for piece in pieces:
            p.feed(piece)
        p.finish()
        assert [(c.name, c.arguments) for c in p.calls] == [("f", arguments)], len(pieces)


@pytest.mark.parametrize("seed", [0, 1, 2], ids=["whole", "chars", "rand2"])
def test_a_repeated_xml_parameter_keeps_its_last_value(seed):
    """A parameter given twice: vLLM's Qwen3-Coder parser keeps one key, at its first place, with the last value (a
    JSON object holds one). Streamed, the first value has gone out already: the deltas carry both, which JSON readers
    take as the last, the same object; the whole arguments (non-streamed responses) had the key twice."""
    text = XML_CALL.replace("<parameter=zip>", "<parameter=city>\nLyon\n</parameter>\n<parameter=zip>")
    _, streamed, final, _ = run_tools(cuts(text, seed))
    assert streamed == final and final[0][1].count('"city"') == 2
    p = ToolCallParser(TOOLS)
    for piece in cuts(text, seed):
        p.feed(piece)
    p.finish()
    assert p.calls[0].whole_arguments == json.dumps({**XML_ARGS, "city": "Lyon"})
    assert json.loads(p.calls[0].whole_arguments) == json.loads(final[0][1])
    plain = ToolCallParser(TOOLS)
    plain.feed(XML_CALL)
    plain.finish()
    assert plain.calls[0].whole_arguments == plain.calls[0].arguments  # no repeat: the streamed text itself


@pytest.mark.parametrize("seed", [0, 1, 2], ids=["whole", "chars", "rand2"])
def test_a_call_to_a_function_not_in_the_tools_is_still_a_call(seed):
    """A "phantom" function (not in the request's tools): vLLM's Qwen3-Coder parser still returns the call under the
    model's name, streamed or not, its XML values left as text (no schema types them); the client decides."""
    text = "Checking.\n" + XML_CALL.replace("get_weather", "search_web")
    content, streamed, final, _ = run_tools(cuts(text, seed))
    assert content == "Checking." and streamed == final
    assert [(name, json.loads(args)) for name, args in final] == [("search_web", {
        "city": "Paris", "days": "3", "metric": "true", "hours": "[1, 2]", "zip": "007"})]


@pytest.mark.parametrize("seed", [0, 1, 2], ids=["whole", "chars", "rand2"])
def test_json_arguments_that_do_not_parse_stay_a_call(seed):
    """As with OpenAI's API, arguments are the model's text (README): a JSON block whose arguments do not parse is
    still a call, with the same arguments however the text was cut (streamed deltas cannot be taken back)."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": tru}}\n</tool_call>'
    content, streamed, final, _ = run_tools(cuts(text, seed))
    assert content == "" and streamed == final == [("get_weather", '{"city": tru}')]


@pytest.mark.parametrize("seed", [0, 1, 2], ids=["whole", "chars", "rand2"])
def test_parallel_tool_calls_false_reports_the_first_call_only(seed):
    """The request's parallel_tool_calls=false under tool_choice auto: later blocks are dropped (as vLLM and OpenAI
    do), not returned as calls or as content."""
    text = "Sure.\n" + XML_CALL + "\n" + JSON_CALL
    p, content, calls = ToolCallParser(TOOLS, parallel=False), "", {}
    for piece in cuts(text, seed) + [None]:
        d = p.finish() if piece is None else p.feed(piece)
        content += d.content
        for tc in d.tool_calls:
            calls.setdefault(tc.index, [tc.name, ""])[1] += tc.arguments
    assert content == "Sure." and list(calls) == [0] and [(c.name, c.arguments) for c in p.calls] == [tuple(calls[0])]
    assert json.loads(calls[0][1]) == XML_ARGS


REFUSALS = {  # an engine refusal -> the request field a 400 names
    "bad_words_without_tokenizer": ("bad_words need the model's tokenizer.json; ban token ids with logit_bias",
                                    "bad_words"),  # named logit_bias, the alternative it offers
    "stop_without_tokenizer": ("stop strings need the model's tokenizer.json; use stop_token_ids", "stop"),
    "allowed_vs_bad_words": ("allowed_token_ids holds only tokens that bad_words ban", "allowed_token_ids"),
    "logit_bias": ("logit_bias token id 9 is outside the vocabulary (0..5)", "logit_bias"),
    "stop_token_ids": ("stop_token_ids token id 9 is outside the vocabulary (0..5)", "stop_token_ids"),
    "structured": ("structured output: the regex does not compile: x", "messages.structured"),
    "prompt": ("the prompt is empty: give at least one token", "messages"),
    "other": ("something else", None),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_an_engine_refusal_names_the_field_at_fault(case):
    from deltaserve.serve.serving import refused_field

    message, field = REFUSALS[case]
    assert refused_field(message, "messages.structured", "messages") == field


def test_xml_union_parameters_convert_by_their_first_non_null_type():
    """A parameter typed by anyOf / oneOf (pydantic's Optional[int], Optional[Model], a union of objects) converts by
    its first non-null branch, as vLLM's Qwen3-Coder parser does: its value was kept as a JSON string ("5", a
    double-encoded object); a nullable union's null / None is null."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "where": {"oneOf": [{"type": "object", "properties": {"city": {"type": "string"}}},
                            {"type": "object", "properties": {"lat": {"type": "number"}}}]},
        "model": {"anyOf": [{"$ref": "#/$defs/M"}, {"type": "null"}]},
        "after": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "name": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}}}}]
    text = ("<tool_call>\n<function=f>\n<parameter=limit>\n5\n</parameter>\n<parameter=where>\n{\"city\": \"P\"}\n"
            "</parameter>\n<parameter=model>\n{\"a\": 1}\n</parameter>\n<parameter=after>\nNone\n</parameter>\n"
            "<parameter=name>\n007\n</parameter>\n</function>\n</tool_call>")
    for seed in (0, 1):
        _, streamed, final, _ = run_tools(cuts(text, seed), tools)
        assert streamed == final
        assert json.loads(final[0][1]) == {"limit": 5, "where": {"city": "P"}, "model": {"a": 1}, "after": None,
                                           "name": "007"}


@pytest.mark.parametrize("text, cut", [
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n", False),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', False),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", True),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', True),
    ('<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n', False),
    ('<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Par', True),
], ids=["xml-whole", "json-whole", "xml-cut", "json-cut", "json-string-args-whole", "json-string-args-cut"])
def test_a_whole_call_without_its_closing_tag_is_not_cut(text, cut):
    """A text that ends after a call's arguments are whole but before </tool_call> (the client's
    stop=["</tool_call>"], or EOS in its place) holds a whole call: finish_reason "tool_calls" (it was "stop", as for
    a call a stop string cut inside its arguments)."""
    from deltaserve.serve.serving_chat import ChoiceParser
    for pieces in ([text], list(text)):
        p = ChoiceParser(in_reasoning=False, thinking=False, tools=TOOLS)
        for i, piece in enumerate(pieces):
            p.feed(piece, final=i == len(pieces) - 1)
        assert [c.name for c in p.tools.calls] == ["get_weather"]
        assert (p.tools.cut, p.finish_reason("stop")) == (cut, "stop" if cut else "tool_calls")


@pytest.mark.parametrize("seed", [0, 1, 2, 3], ids=["whole", "chars", "rand2", "rand3"])
def test_a_tool_call_ends_reasoning_left_open(seed):
    """Qwen3.5 may write its <tool_call> without closing </think> (its template opened the block): a <tool_call>
    followed by <function= ends the reasoning, as in vLLM's Qwen3 parser (the call was lost in reasoning_content). A
    <tool_call> mentioned in the reasoning without a function after it stays reasoning; without tools, all of it."""
    from deltaserve.serve.serving_chat import ChoiceParser

    def run(text, tools):
        p, reasoning, content = ChoiceParser(in_reasoning=True, thinking=True, tools=tools), "", ""
        pieces = cuts(text, seed)
        for i, piece in enumerate(pieces):
            r, d = p.feed(piece, final=i == len(pieces) - 1)
            reasoning, content = reasoning + r, content + d.content
        calls = [(c.name, json.loads(c.arguments)) for c in p.tools.calls] if p.tools else []
        return reasoning, content, calls, p.finish_reason("stop")

    text = "Use <tool_call> tags, <tool_call> then a function.\n\n" + XML_CALL
    assert run(text, TOOLS) == ("Use <tool_call> tags, <tool_call> then a function.", "",
                                [("get_weather", XML_ARGS)], "tool_calls")
    assert run(text, None) == (text, "", [], "stop")
    assert run("hmm <tool_call>\n<func", TOOLS) == ("hmm <tool_call>\n<func", "", [], "stop")


@pytest.mark.parametrize("seed", [0, 1, 2, 3], ids=["whole", "chars", "rand2", "rand3"])
def test_a_closing_call_tag_quoted_in_an_xml_value_does_not_end_the_call(seed):
    """Code written as a parameter value may quote "</tool_call>": the value ends at its </parameter>, as vLLM's
    Qwen3-Coder parser reads it (the value was cut there, and the rest of the call came back as content). A value the
    model left without </parameter> and </function> still ends at </tool_call> when another call or the text's end
    follows."""
    value = 'END = "</tool_call>"\nprint(END)'
    text = ("Writing it.\n<tool_call>\n<function=get_weather>\n<parameter=city>\n" + value + "\n</parameter>\n"
            "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n"
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</tool_call>\nThen: "
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</tool_call>\nDone")
    content, streamed, final, _ = run_tools(cuts(text, seed))
    assert streamed == final
    assert [json.loads(args) for _, args in final] == [{"city": value, "days": 2}, {"city": "Rome"}, {"city": "Oslo"}]
    assert content == "Writing it.\nThen: Done"


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut_by_max_tokens"])
def test_a_named_functions_answer_streams_as_its_arguments(cut):
    """tool_choice naming a function: the answer is that call's arguments, passed on as written and streamed as they
    come (vLLM's), whole or cut short (a cut answer came back as content, all at the end)."""
    from deltaserve.serve.forced_tools import ForcedToolCalls
    text = '{"unit": "c", "on": true}'[: 12 if cut else None]
    p, deltas = ForcedToolCalls("set_unit"), []
    for piece in cuts(text, 2):
        deltas += p.feed(piece).tool_calls
    tail = p.finish()
    deltas += tail.tool_calls
    assert tail.content == "" and len(deltas) > 1 and deltas[0].name == "set_unit" and deltas[0].id == p.calls[0].id
    assert all(d.id is None and d.index == 0 for d in deltas[1:])
    assert "".join(d.arguments for d in deltas) == text == p.calls[0].whole_arguments


REQUIRED = ('[{"name": "get_weather", "parameters": {"city": "Pa}ris\\"", "days": 3}},\n'
            ' {"name": "ping", "parameters": {}}]')


def run_required(text: str, seed: int):
    """tool_choice "required"'s answer fed in random pieces -> (content, {index: [name, arguments]} streamed,
    [(name, non-streamed arguments)], cut, n argument deltas)."""
    from deltaserve.serve.forced_tools import ForcedToolCalls
    p, deltas, content = ForcedToolCalls(None), [], ""
    for piece in cuts(text, seed):
        d = p.feed(piece)
        deltas, content = deltas + d.tool_calls, content + d.content
    tail = p.finish()
    deltas, content = deltas + tail.tool_calls, content + tail.content
    streamed = {}
    for d in deltas:
        if d.id is not None:
            assert d.index not in streamed and d.index == len(streamed)
            streamed[d.index] = [d.name, ""]
        streamed[d.index][1] += d.arguments
    n_args = sum(1 for d in deltas if d.arguments)
    return content, streamed, [(c.name, c.whole_arguments) for c in p.calls], p.cut, n_args


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("end, content, calls", [
    (len(REQUIRED), "", [("get_weather", '{"city": "Pa}ris\\"", "days": 3}'), ("ping", "{}")]),
    (REQUIRED.index('"days"'), "", [("get_weather", '{"city": "Pa}ris\\"", ')]),  # inside its parameters
    (REQUIRED.index(', "param'), "", [("get_weather", "")]),  # after its name: the call, no arguments yet
    (REQUIRED.index("ping") + 2, "", [("get_weather", '{"city": "Pa}ris\\"", "days": 3}')]),  # next name cut
    (12, '[{"name": "g', []),  # nothing named: the text is content
], ids=["whole", "in_parameters", "after_name", "before_next_name", "before_any_name"])
def test_required_tool_calls_stream_and_survive_a_cut(seed, end, content, calls):
    """tool_choice "required": each call opens when its name is whole and streams its parameters as written; cut
    off by max_tokens, the calls named so far are kept, the last with its partial arguments (the whole list came
    back as content, no call, and nothing streamed before the end)."""
    got_content, streamed, final, cut, n_args = run_required(REQUIRED[:end], seed)
    assert (got_content, cut) == (content, end < len(REQUIRED))
    assert [tuple(v) for v in streamed.values()] == calls
    assert final == calls  # (REQUIRED's parameters are written as json.dumps writes them)
    if end == REQUIRED.index('"days"') and seed:  # seed 0 feeds the text whole
        assert n_args > 1  # streamed as it came, not at the end


def test_required_whole_calls_keep_vllms_arguments():
    """A whole call's non-streamed arguments are json.dumps of its parameters (vLLM's); streamed, the text written."""
    content, streamed, final, cut, _ = run_required('[{"name": "ping",\n"parameters": {\n"a" :1}}]', 0)
    assert (content, cut, final) == ("", False, [("ping", '{"a": 1}')])
    assert streamed == {0: ["ping", '{\n"a" :1}']}


@pytest.mark.parametrize("text, content, calls", [
    ('[{"name": "x", "parameters": {"a": 1}, "extra": 2}]', ', "extra": 2}]', [("x", '{"a": 1}')]),
    ('[{"name": "x", "parameters": {"a": 1}}] and more', "and more", [("x", '{"a": 1}')]),
    ('{"name": "x"}', '{"name": "x"}', []),
], ids=["extra_key", "text_after_the_list", "not_a_list"])
def test_required_answer_off_the_shape_keeps_the_rest_as_content(text, content, calls):
    """Only without the grammar: text that leaves the forced shape comes back as content from where it did."""
    got, streamed, _, _, _ = run_required(text, 0)
    assert (got, [tuple(v) for v in streamed.values()]) == (content, calls)


@pytest.mark.parametrize("escape, text", [
    (r"\ud800", "\ufffd"), (r"\udc00", "\ufffd"), (r"\ud800\u0041", "\ufffdA"), (r"\ud800\ud800", "\ufffd\ufffd"),
    (r"\ud83d\ude00", "\U0001f600"), (r"\\ud800", r"\ud800"), (r"\\\ud800", "\\\ufffd"), (r"\"\udfff", '"\ufffd'),
], ids=["high", "low", "high_then_letter", "two_highs", "pair", "escaped_backslash", "backslash_then_lone",
        "quote_then_lone"])
def test_a_lone_surrogate_escape_reads_as_a_replacement_character(escape, text):
    """JSON.stringify writes a lone surrogate (half of a cut emoji) as an escape, which Python's json takes and
    pydantic refused ("unexpected end of hex escape"): it reads as U+FFFD, as a UTF-8 encoder writes it."""
    from deltaserve.serve.protocol import CompletionRequest, parse_request
    req = parse_request(CompletionRequest, b'{"prompt": "a' + escape.encode() + b'b"}')
    assert req.prompt == "a" + text + "b"


def test_ignored_request_fields_are_logged(caplog):
    """A field the server does not know (a typo such as "max_token") changed nothing and was logged at debug level
    only; vLLM warns. Fields it reads (cache_salt) are not named."""
    from deltaserve.serve.protocol import CompletionRequest, parse_request
    with caplog.at_level("WARNING", logger="deltaserve"):
        parse_request(CompletionRequest, b'{"prompt": "a", "max_token": 5, "cache_salt": "x"}')
        parse_request(CompletionRequest, b'{"prompt": "a", "cache_salt": "x"}')
    assert [r.getMessage() for r in caplog.records] == [
        "The following fields were present in the request but ignored: ['max_token']"]
