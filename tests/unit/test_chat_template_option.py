"""A chat template of the user's instead of the model's: `--chat-template` (serve, chat, generate --chat; a file or
the Jinja itself, as vLLM reads it) and, on a server started with `--trust-request-chat-template`, a request's
`chat_template` field (refused otherwise, as in vLLM: it is Jinja from clients, run in the sandbox either way)."""
from types import SimpleNamespace

import pytest

pytest.importorskip("pydantic")  # the server's request models: a project requirement, absent from the GPU image

from test_weights import make_unreadable  # noqa: E402

from deltaserve import cli  # noqa: E402
from deltaserve.serve.protocol import APIError, ChatCompletionRequest, TokenizeRequest  # noqa: E402
from deltaserve.serve.serving import ServingContext  # noqa: E402
from deltaserve.serve.serving_chat import chat_prompt  # noqa: E402
from deltaserve.serve.serving_tokenize import tokenize  # noqa: E402
from deltaserve.tiny import make_tiny  # noqa: E402

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


def build(tiny, *flags):
    return cli._build_llm(cli.build_parser().parse_args(["generate", "--prompt", "x", "--chat", "--model", tiny,
                                                         "--device", "cpu", "--max-model-len", "64", *flags]))


@pytest.mark.parametrize("as_file", [False, True], ids=["inline", "file"])
def test_cli_chat_template_renders_every_chat(tiny, tmp_path, as_file):
    value = TEMPLATE
    if as_file:
        (tmp_path / "t.jinja").write_text(TEMPLATE)
        value = str(tmp_path / "t.jinja")
    llm = build(tiny, "--chat-template", value)
    out = llm.chat(HELLO, use_tqdm=False)[0]
    assert llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False) == "<user>hello>>"


@pytest.mark.parametrize("value, needle", [("{% for m in messages %}", "not valid Jinja"),
                                           ("/no/such/template.jinja", "no such file"),
                                           ("my_template.jinja", "looks like a file path")],
                         ids=["bad-jinja", "no-file", "bare-name-no-file"])
def test_cli_chat_template_errors_are_one_line(tiny, capsys, value, needle):
    argv = ["generate", "--prompt", "x", "--chat", "--model", tiny, "--device", "cpu", "--chat-template", value]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("flag", ["--chat-template", "--json-schema"])
@pytest.mark.parametrize("problem, needle", [("unreadable", "cannot be read (Permission denied)"),
                                             ("latin-1", "is not UTF-8 text; save it as UTF-8")],
                         ids=["unreadable", "not-utf8"])
def test_cli_flag_file_that_cannot_be_read_is_one_sentence(tiny, tmp_path, capsys, monkeypatch, flag, problem,
                                                           needle):
    """A template or schema file that may not be read, or is saved as Latin-1, gave "error: [Errno 13] Permission
    denied: 't.jinja'" / "error: 'utf-8' codec can't decode byte 0xe9 ...", naming neither the flag nor (utf-8) the
    file."""
    path = tmp_path / "f.txt"
    path.write_bytes('{"description": "caf\xe9"}'.encode("latin-1"))
    if problem == "unreadable":
        make_unreadable(str(path), monkeypatch)
    argv = ["generate", "--prompt", "x", "--chat", "--model", tiny, "--device", "cpu", flag, str(path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {flag} file {path} {needle}"], err


def context(tiny, trusted: bool, exclude_tools: bool = False) -> ServingContext:
    llm = build(tiny)
    engine = SimpleNamespace(llm=llm, tokenizer=llm.tokenizer, max_model_len=llm.max_model_len)
    return ServingContext(engine, "m", trust_request_chat_template=trusted,
                          exclude_tools_when_tool_choice_none=exclude_tools)


def test_request_chat_template_needs_the_servers_trust(tiny):
    req = ChatCompletionRequest(model="m", messages=HELLO, chat_template=TEMPLATE)
    with pytest.raises(APIError, match="--trust-request-chat-template") as e:
        chat_prompt(context(tiny, trusted=False), req)
    assert e.value.status == 400 and e.value.param == "chat_template"
    ctx = context(tiny, trusted=True)
    assert chat_prompt(ctx, req) == "<user>hello>>"
    assert chat_prompt(ctx, ChatCompletionRequest(model="m", messages=HELLO)) != "<user>hello>>"
    ids = tokenize(ctx, TokenizeRequest(messages=HELLO, chat_template=TEMPLATE))["tokens"]
    assert ctx.tokenizer.decode(ids, skip_special_tokens=False) == "<user>hello>>"
    with pytest.raises(APIError, match="not valid Jinja"):
        chat_prompt(ctx, ChatCompletionRequest(model="m", messages=HELLO, chat_template="{% if %}"))
    with pytest.raises(APIError, match="may not set 'chat_template'"):
        chat_prompt(ctx, ChatCompletionRequest(model="m", messages=HELLO,
                                               chat_template_kwargs={"chat_template": TEMPLATE}))


def test_documents_reach_the_chat_template(tiny):
    """vLLM's `documents` field is the template's `documents` variable (chat_template_kwargs may not set it and says
    to use the field; the field was accepted and dropped)."""
    ctx = context(tiny, trusted=True)
    template = "{% for d in documents or [] %}[{{ d.title }}: {{ d.text }}]{% endfor %}" + TEMPLATE
    docs = [{"title": "Paris", "text": "capital of France"}]
    req = ChatCompletionRequest(model="m", messages=HELLO, chat_template=template, documents=docs)
    assert chat_prompt(ctx, req) == "[Paris: capital of France]<user>hello>>"
    ids = tokenize(ctx, TokenizeRequest(messages=HELLO, chat_template=template, documents=docs))["tokens"]
    assert ctx.tokenizer.decode(ids, skip_special_tokens=False) == "[Paris: capital of France]<user>hello>>"
    assert chat_prompt(ctx, ChatCompletionRequest(model="m", messages=HELLO, chat_template=template)) == \
        "<user>hello>>"


# templates that raise a plain Python error while compiling or rendering (jinja's own TemplateError, raise_exception's,
# and the TypeError / ValueError / KeyError / AttributeError of a message field the template cannot use were handled)
FAILING_TEMPLATES = {
    "zero-division": ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    "sandbox-range": ("{% for i in range(10 ** 6) %}{% endfor %}", "OverflowError: Range too big"),
    "format-index": ("{{ '{0}'.format() }}", "IndexError"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    "nested-too-deep": ("{{ " + "(" * 500 + "1" + ")" * 500 + " }}", "RecursionError"),  # in jinja's parser
}


@pytest.fixture(scope="module")
def trusted(tiny):
    """A server context that takes a request's chat_template (its LLM serves LLM.chat too)."""
    return context(tiny, trusted=True)


@pytest.mark.parametrize("template, needle", FAILING_TEMPLATES.values(), ids=FAILING_TEMPLATES.keys())
def test_template_that_fails_while_rendering_is_one_sentence(trusted, template, needle):
    """Such an error came out of LLM.chat (and generate --chat) as a bare exception from inside jinja with a
    traceback, and out of the server as a 500; now a ValueError naming the chat template and the error: a 400."""
    with pytest.raises(ValueError) as e:
        trusted.engine.llm.chat(HELLO, chat_template=template, use_tqdm=False)
    msg = str(e.value)
    assert "chat template" in msg and needle in msg and "\n" not in msg, msg
    with pytest.raises(APIError) as e:
        chat_prompt(trusted, ChatCompletionRequest(model="m", messages=HELLO, chat_template=template))
    assert e.value.status == 400 and needle in str(e.value), str(e.value)
    with pytest.raises(APIError) as e:
        tokenize(trusted, TokenizeRequest(messages=HELLO, chat_template=template))
    assert e.value.status == 400 and needle in str(e.value), str(e.value)


def test_cli_template_that_fails_while_rendering_is_one_line(tiny, capsys):
    template, needle = FAILING_TEMPLATES["zero-division"]
    argv = ["generate", "--prompt", "x", "--chat", "--model", tiny, "--device", "cpu", "--chat-template", template]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: The chat template") and needle in err[0], err


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("exclude", [False, True], ids=["default", "exclude-tools-flag"])
def test_tool_choice_none_renders_the_tools_unless_the_server_excludes_them(tiny, exclude):
    """tool_choice "none" left the tools out of the prompt; vLLM renders them (the model sees them, no call is
    parsed) and leaves them out only under --exclude-tools-when-tool-choice-none. /tokenize renders as chat does."""
    ctx = context(tiny, trusted=False, exclude_tools=exclude)

    def prompt(**fields):
        return chat_prompt(ctx, ChatCompletionRequest(model="m", messages=HELLO, **fields))

    none = prompt(tools=TOOLS, tool_choice="none")
    assert none == (prompt() if exclude else prompt(tools=TOOLS, tool_choice="auto"))
    assert ("get_weather" in none) is not exclude, none
    ids = tokenize(ctx, TokenizeRequest(messages=HELLO, tools=TOOLS, tool_choice="none"))["tokens"]
    assert ctx.tokenizer.decode(ids, skip_special_tokens=False) == none
