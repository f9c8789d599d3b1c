"""Tokenizer, chat template and streaming detokenizer, on `tokenizers` + `jinja2` (no transformers at runtime).

`Tokenizer.from_dir` reads a Hugging Face tokenizer directory and renders chat templates the way transformers'
`apply_chat_template` does, so prompts match the reference byte for byte. `IncrementalDetokenizer` turns sampled
ids into text deltas. `train_tiny_tokenizer` writes a small Qwen-style tokenizer for tests and tiny checkpoints.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Backend


class TokenizerError(ValueError):
    """A tokenizer directory, chat template or conversation cannot be used; the message says why."""


# transformers passes a message's reasoning under all of these names; templates read `reasoning_content`
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_ROLES = ("system", "user", "assistant", "tool")  # what Qwen3.5's template renders (others vanish from the prompt)


def _token_content(value) -> str | None:
    # tokenizer_config.json stores a special token as a plain string or as a serialized AddedToken dict
    return value.get("content") if isinstance(value, dict) else value


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes `<`, `>` and `&`, which would change what the model sees
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (it marks the assistant's text for training masks):
    renders its body as it is, as transformers does (without it such a template did not compile)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    # chat templates come from the Hub and are untrusted code, hence the sandbox
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])


@lru_cache(maxsize=8)
def _compile_chat_template(source: str, origin: str | None = None) -> jinja2.Template:
    """origin: the file the template came from, named in the error (None: one given by the caller)."""
    what = f"The chat template in {origin}" if origin else "The chat template"
    env = _environment()
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{what} is not valid Jinja (line {e.lineno}: {e.message}).") from e
    except Exception as e:  # noqa: BLE001 - e.g. a RecursionError in jinja's parser on deeply nested expressions
        raise TokenizerError(f"{what} cannot be compiled ({_error_text(e)}).") from e


def _error_text(e: Exception) -> str:
    """'ZeroDivisionError: division by zero': an error raised inside a template, on one line."""
    first = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@lru_cache(maxsize=8)
def _renders_parts(source: str) -> bool:
    """Whether a chat template renders a message's content parts itself: vLLM's "openai" content format, as its
    `_detect_content_format` decides it (vllm/renderers/hf.py), from the template's syntax tree: a loop over
    `m.content` (or `m['content']`, filtered or sliced) where `m` is the variable of a loop over `messages` (or over a
    variable set from it), or a loop over a variable named `content` (Qwen3.5's render_content macro). Otherwise
    ("string") vLLM joins the text parts with "\n" before rendering. The source compiles (checked before)."""
    tree = _environment().parse(source)
    loops = [loop for loop in tree.find_all(jinja2.nodes.For) if isinstance(loop.target, jinja2.nodes.Name)]
    lists, grew = {"messages"}, True
    while grew:  # {% set msgs = messages[1:] %}, and names set from those
        new = {a.target.name for a in tree.find_all(jinja2.nodes.Assign) if isinstance(a.target, jinja2.nodes.Name)
               and _name_of(_elements(a.node)) in lists}
        lists, grew = lists | new, not new <= lists
    message_vars = {loop.target.name for loop in loops if _name_of(_elements(loop.iter)) in lists}
    for loop in loops:
        it = _elements(loop.iter)
        key = it.attr if isinstance(it, jinja2.nodes.Getattr) else \
            it.arg.value if isinstance(it, jinja2.nodes.Getitem) and isinstance(it.arg, jinja2.nodes.Const) else None
        if key == "content" and _name_of(it.node) in message_vars or _name_of(loop.iter) == "content":
            return True
    return False


def _elements(node: jinja2.nodes.Node) -> jinja2.nodes.Node:
    """What a loop or `set` reads the elements of, under filters, tests and slices (`messages[1:]|reverse`)."""
    while isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)) and node.node is not None or \
            isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        node = node.node
    return node


def _name_of(node: jinja2.nodes.Node) -> str | None:
    return node.name if isinstance(node, jinja2.nodes.Name) and node.ctx == "load" else None


CONTENT_FORMATS = ("auto", "string", "openai")  # vLLM's chat_template_content_format
# vLLM's text part types, and the key that holds each one's text
_TEXT_PART_KEYS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
                   "thinking": "thinking"}
# the keys vLLM reads a part's type from when it has no "type" (e.g. {"image_url": "https://..."})
_UNTYPED_MEDIA_KEYS = ("image_url", "image_pil", "image_embeds", "audio_embeds", "prompt_embeds", "audio_url",
                       "input_audio", "video_url")


def non_text_part_message(index: int, part_type: str) -> str:
    """The sentence refusing messages[index]'s content part of a non-text type (the server and LLM.chat say it)."""
    return (f"messages[{index}] has a {part_type!r} content part, but this model is text-only: send text parts "
            f"({{'type': 'text', 'text': ...}}) only.")


def _part_texts(parts: list, index: int) -> list[str]:
    """messages[index]'s content parts -> their texts, as vLLM reads them: a plain string is a text part, and an
    empty text is left out (vLLM drops it); a non-text part and a malformed one are refused in one sentence."""
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, str):
            text = part
        elif not isinstance(part, dict):
            raise TokenizerError(f"messages[{index}].content[{j}] must be a string or a part like "
                                 f"{{'type': 'text', 'text': ...}}, got {part!r:.80}.")
        elif "type" not in part:
            media = next((k for k in _UNTYPED_MEDIA_KEYS if k in part), None)
            if media is not None:
                raise TokenizerError(non_text_part_message(index, media))
            raise TokenizerError(f"messages[{index}].content[{j}] has no 'type'; a text part is "
                                 f"{{'type': 'text', 'text': ...}}.")
        elif part["type"] not in _TEXT_PART_KEYS:
            raise TokenizerError(non_text_part_message(index, part["type"]))
        else:
            key = _TEXT_PART_KEYS[part["type"]]
            text = part.get(key)
            if not isinstance(text, str):
                raise TokenizerError(f"messages[{index}].content[{j}] is a {part['type']!r} part without a {key!r} "
                                     f"string; got {part!r:.80}.")
        if text:
            texts.append(text)
    return texts


def _normalize_message(message, index: int = 0, parts_separator: str | None = "\n") -> dict:
    """message: messages[index]. parts_separator: what a non-tool message's text parts are joined with ("" where
    the template renders the parts itself, see _renders_parts); None: vLLM's "openai" content format, where the
    content reaches the template as a list of {'type': 'text', 'text': ...} parts (a string content too)."""
    # Like transformers: drop None values (OpenAI sends content=None with tool_calls) and alias reasoning fields
    if not isinstance(message, dict):
        raise TokenizerError(f"Each chat message must be a dict with 'role' and 'content', got {message!r}.")
    message = {k: v for k, v in message.items() if v is not None}
    role = message.get("role")
    if role == "developer":  # OpenAI's newer name for the system role
        message["role"] = role = "system"
    if role not in _ROLES:
        raise TokenizerError(f"Each chat message needs a 'role' of {', '.join(_ROLES)}; got {role!r}.")
    content = message.get("content")
    if isinstance(content, list) or isinstance(content, str) and parts_separator is None and role != "tool":
        # OpenAI content parts: the text ones (a text-only model)
        texts = _part_texts(content if isinstance(content, list) else [content], index)
        if role == "tool" or parts_separator is not None:
            # vLLM joins them with "\n" (a tool result's parts always: most templates read a tool result as a
            # string); a template that loops over them gets them as parts from vLLM, which the "" join renders alike
            # for Qwen3.5's (`{{- item.text }}` back to back) and keeps the content a string for
            # continue_final_message
            content = ("\n" if role == "tool" else parts_separator).join(texts)
        else:
            content = [{"type": "text", "text": t} for t in texts]
        message["content"] = content
    if content is None and role != "assistant" or content is not None and not isinstance(content, (str, list)):
        raise TokenizerError(f"messages[{index}] ({role}): 'content' must be a string (or a list of text parts); "
                             f"got {content!r:.80}.")
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    if isinstance(message.get("tool_calls"), list):
        message["tool_calls"] = [_parsed_arguments(call) for call in message["tool_calls"]]
    return message


def _parsed_arguments(call):
    """A tool call as OpenAI sends it back ('arguments' a JSON string) -> 'arguments' as the object, which chat
    templates expect (Qwen3.5's iterates it with `|items`, which fails on a string), as vLLM does
    (`_postprocess_messages`): text that is not JSON (a call the model wrote badly, which our server returns as it
    is), "" and a missing or null value become {}, so the conversation still renders."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return call
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            args = {}
    elif not isinstance(args, (dict, list)):
        args = {}
    return {**call, "function": {**fn, "arguments": args}}


class Tokenizer:
    """A byte-level BPE tokenizer (`tokenizers` backend) plus the special tokens and chat template of its model."""

    def __init__(self, backend: _Backend, config: dict, chat_template: str | dict[str, str] | None,
                 template_file: str | None = None, name_or_path: str = ""):
        self._backend = backend
        self.chat_template = chat_template  # one template, or {name: template} (old multi-template configs)
        self.template_file = template_file  # where chat_template came from (errors name it); None: given in code
        self.name_or_path = name_or_path  # the folder it was loaded from, as given (transformers' name_or_path)
        # the template variables transformers passes from `special_tokens_map` (only tokens that are set)
        self.special_tokens = {
            name: _token_content(config[name])
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if _token_content(config.get(name)) is not None
        }
        self.all_special_tokens = _all_special_tokens(config)  # transformers' list, in its order
        max_length = config.get("model_max_length")
        # transformers' VERY_LARGE_INTEGER stands for "no limit" when the config gives none
        self.model_max_length = max_length if isinstance(max_length, int) else int(1e30)

    @classmethod
    def from_dir(cls, path: str) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` and (if present) `chat_template.jinja` from `path`."""
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise TokenizerError(f"No tokenizer.json in {path!r}; point at a Hugging Face model or tokenizer folder.")
        try:  # the tokenizers library reports a file it may not read as a bare Exception, "not a valid" one here
            with open(tokenizer_file, "rb"):
                pass
        except OSError as e:
            raise _unreadable(tokenizer_file, e) from None
        try:
            backend = _Backend.from_file(tokenizer_file)
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise TokenizerError(f"{tokenizer_file} is not a valid tokenizer file "
                                 f"({(str(e).splitlines() or [type(e).__name__])[0]}).") from None
        config = {}
        config_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_file):
            try:
                with open(config_file, encoding="utf-8") as f:
                    config = json.load(f)
            except OSError as e:
                raise _unreadable(config_file, e) from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{config_file} is not valid JSON ({e}).") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_file} must hold a JSON object, got a {type(config).__name__}.")
            _check_config_fields(config, config_file)
        _check_added_tokens(backend, config.get("added_tokens_decoder", {}), path)
        # transformers' `split_special_tokens`: special-token strings in the text encode as plain text
        backend.encode_special_tokens = config.get("split_special_tokens", False)
        if _loads_as_qwen35(path, config):
            # as transformers' Qwen3_5Tokenizer, which rebuilds these over tokenizer.json's: one re-saved by
            # transformers 5 often holds Qwen2's split, which cuts Hindi, Thai, ... words at every combining mark
            backend.normalizer = normalizers.NFC()
            backend.pre_tokenizer = _byte_level_pre_tokenizer(_QWEN35_SPLIT, config.get("add_prefix_space") is True)
            backend.decoder = decoders.ByteLevel()
        chat_template = config.get("chat_template")
        template_file = config_file if chat_template else None
        if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            chat_template = {t["name"]: t["template"] for t in chat_template}
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):  # transformers >= 4.50 saves the template here; it wins over the config
            try:
                with open(jinja_file, encoding="utf-8") as f:
                    chat_template = f.read()
                template_file = jinja_file
            except OSError as e:
                raise _unreadable(jinja_file, e) from None
            except UnicodeDecodeError:
                raise TokenizerError(f"{jinja_file} is not UTF-8 text; save the chat template as UTF-8.") from None
        return cls(backend, config, chat_template, template_file, path)

    # ---- ids <-> text ----
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """text -> ids; special tokens written in `text` (e.g. `<|im_start|>`) map to their single ids.
        TokenizerError for a str holding a lone surrogate (what Python makes of bytes that are not UTF-8 on stdin
        or in argv): the backend raised a bare TypeError."""
        try:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            bad = next((ch for ch in text if "\ud800" <= ch <= "\udfff"), None) if isinstance(text, str) else None
            if bad is None:
                raise
            raise TokenizerError(f"the text is not valid Unicode: it holds the lone surrogate U+{ord(bad):04X} "
                                 f"(input bytes that were not UTF-8?)") from None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """ids -> text; a character whose bytes are cut off at either end decodes to U+FFFD."""
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (`len(hf_tokenizer)`; may be below the model's embedding rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def base_vocab_size(self) -> int:
        """Number of ids without the added tokens (transformers' `vocab_size`)."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        """Every token (byte-level spelling) -> its id, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        """vocab_size, as transformers' and vLLM's `len(tokenizer)` gives it (their `vocab_size` leaves out the added
        tokens)."""
        return self.vocab_size

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special_tokens.get("eos_token")
        return None if eos is None else self.token_to_id(eos)

    @property
    def special_token_ids(self) -> set[int]:
        """Ids of the added tokens marked special (`<|im_start|>`, `<|im_end|>`, ...), which skip_special_tokens
        drops."""
        return {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # ---- chat ----
    def set_chat_template(self, source: str) -> None:
        """Render every chat with `source` (Jinja, sandboxed like the model's own) instead of the checkpoint's
        template; TokenizerError if it is not valid Jinja."""
        if not isinstance(source, str) or not source.strip():
            raise TokenizerError("The chat template must be a non-empty Jinja template string.")
        _compile_chat_template(source)
        self.chat_template, self.template_file = source, None

    def check_chat_template(self) -> None:
        """TokenizerError naming the file where the model's own chat template (each of an old multi-template config's)
        is not valid Jinja: what a chat would otherwise report at its first message (deltaserve chat checks first)."""
        templates = self.chat_template if isinstance(self.chat_template, dict) else {None: self.chat_template}
        for source in templates.values():
            if isinstance(source, str) and source:
                _compile_chat_template(source, self.template_file)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
        tokenize: bool = False, continue_final_message: bool = False, chat_template: str | None = None,
        chat_template_content_format: str = "auto", **template_kwargs
    ) -> str | list[int]:
        """Render a conversation to prompt text, as `hf_tokenizer.apply_chat_template(..., tokenize=False)` does
        (tokenize=True: its token ids; HF's default is True, ours False).

        messages: [{"role": ..., "content": ..., optional "tool_calls"/"reasoning_content"}]; tools: JSON schemas.
        continue_final_message: the text ends right after the last message's content (as HF cuts it), so the model
        goes on with that message (a prefilled answer) instead of starting a new turn. chat_template: a Jinja
        template to use instead of the tokenizer's own (sandboxed as that one). chat_template_content_format: how a
        message's text parts reach the template, as vLLM's option: "string" joined with "\n" into one string,
        "openai" as a list of {'type': 'text', 'text': ...} parts, "auto" by what the template reads (see
        _renders_parts); a tool result's parts are always joined with "\n", as vLLM joins them.
        template_kwargs become template variables, e.g. `enable_thinking=False`.
        """
        if tokenize:
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools,
                                                        continue_final_message=continue_final_message,
                                                        chat_template=chat_template,
                                                        chat_template_content_format=chat_template_content_format,
                                                        **template_kwargs))
        if continue_final_message:
            return self._continued(messages, add_generation_prompt, tools, chat_template,
                                   {"chat_template_content_format": chat_template_content_format, **template_kwargs})
        if not messages:
            raise TokenizerError("Cannot apply the chat template to an empty conversation; pass at least one message.")
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise TokenizerError("Each tool must be a JSON-schema dict like {'type': 'function', 'function': {...}}.")
        template, separator = self._template(chat_template, tools, chat_template_content_format)
        chat = [_normalize_message(m, i, separator) for i, m in enumerate(messages)]
        variables = {"documents": None, **self.special_tokens, **template_kwargs}  # as transformers passes them
        try:
            return template.render(messages=chat, tools=tools, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"The chat template rejected this conversation: {e}") from e
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # a field of a type the template cannot use
            raise TokenizerError(f"The chat template could not render this conversation ({_error_text(e)}); "
                                 "check the types of the message fields.") from e
        except Exception as e:  # noqa: BLE001 - the template's own bug (1 / 0, a sandbox limit, endless recursion):
            # one sentence for the CLI and LLM.chat, a 400 from the server, not a traceback or a 500
            raise TokenizerError(f"The chat template failed while rendering this conversation ({_error_text(e)}).") \
                from e

    def _continued(self, messages: list[dict], add_generation_prompt: bool, tools: list | None,
                   chat_template: str | None, template_kwargs: dict) -> str:
        """The conversation rendered without a generation prompt and cut after its last message's content (its last
        text part under the "openai" content format, as HF continues a list content)."""
        if add_generation_prompt:
            raise TokenizerError("continue_final_message continues the last message; it cannot be combined with "
                                 "add_generation_prompt=True (set it to False).")
        # the content as apply_chat_template joins its parts
        fmt = template_kwargs.get("chat_template_content_format", "auto")
        separator = self._template(chat_template, tools, fmt)[1]
        last = _normalize_message(messages[-1], len(messages) - 1, separator) if messages else {}
        final = last.get("content")
        parts = final if isinstance(final, list) else None
        if parts is not None:
            final = parts[-1]["text"] if parts else ""
        if final is None:  # as HF; empty content is continued (e.g. a prefilled reasoning_content: the answer follows)
            raise TokenizerError("continue_final_message continues the last message, which has no content to continue.")
        # where the content ends, marked: HF cuts at the content's last occurrence in the text, which for "end" is
        # inside the template's own "<|im_end|>" after it (the prompt then ended "end<|im_end")
        # HF's tag ends in a space: a template that trims the content (Qwen3.5's `|trim`) drops it, and HF then also
        # drops the content's own trailing whitespace, which the template would have trimmed ('{"name": ' ends ':')
        end = final + _CONTENT_END + " "
        marked = [*messages[:-1], {**last, "content": end if parts is None else
                                   [*parts[:-1], {"type": "text", "text": end}]}]
        text = self.apply_chat_template(marked, False, tools, chat_template=chat_template, **template_kwargs)
        if text.count(_CONTENT_END) == 1:
            at = text.index(_CONTENT_END)
            return text[:at] if text.startswith(" ", at + len(_CONTENT_END)) else text[:at].rstrip()
        text = self.apply_chat_template(messages, False, tools, chat_template=chat_template, **template_kwargs)
        if final not in text:  # HF's order: the content as given, else stripped (templates that trim messages)
            final = final.strip()
        if not final or final not in text:  # (empty content is found only by its marker)
            raise TokenizerError("The chat template does not write the last message's text, so it cannot be "
                                 "continued.")
        return text[: text.rindex(final) + len(final)]

    def _template(self, chat_template: str | None, tools: list | None,
                  content_format: str = "auto") -> tuple[jinja2.Template, str | None]:
        """The template a chat renders with (chat_template, else the tokenizer's own) and what a message's text
        parts are joined with for it (None: they reach it as a list, the "openai" content format)."""
        if content_format not in CONTENT_FORMATS:
            raise TokenizerError(f"chat_template_content_format must be 'auto', 'string' or 'openai', got "
                                 f"{content_format!r:.80}.")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TokenizerError(f"chat_template must be a Jinja template string, got {type(chat_template).__name__}.")
        source = chat_template or self._pick_template(bool(tools))
        # first: a template that does not compile is one sentence, naming the file where it is the model's own
        template = _compile_chat_template(source, None if chat_template else self.template_file)
        if content_format != "auto":
            return template, None if content_format == "openai" else "\n"
        return template, "" if _renders_parts(source) else "\n"

    def _pick_template(self, has_tools: bool) -> str:
        template = self.chat_template
        if isinstance(template, dict):  # transformers' rule: "tool_use" when tools are given, else "default"
            template = template.get("tool_use") if has_tools and "tool_use" in template else template.get("default")
        if not template:
            raise TokenizerError(
                "This tokenizer has no chat template (no chat_template.jinja and no 'chat_template' in "
                "tokenizer_config.json); add one or send a plain-text prompt instead."
            )
        return template


_CONTENT_END = "\ue000\ue001"  # private-use characters marking the end of a continued message's content


# the model types transformers' AutoTokenizer loads as Qwen3_5Tokenizer whatever tokenizer_class the files name
_QWEN35_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text")


def _loads_as_qwen35(path: str, config: dict) -> bool:
    """Whether transformers loads the tokenizer in `path` as Qwen3_5Tokenizer: tokenizer_config.json names it, or
    config.json beside it is a Qwen3.5 checkpoint's."""
    if str(config.get("tokenizer_class")).removesuffix("Fast") == "Qwen3_5Tokenizer":
        return True
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):  # none, or not an object: the model's loader reports a bad one
        return False
    return model_type in _QWEN35_MODEL_TYPES


# transformers' named special tokens, in the order its all_special_tokens lists them
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _all_special_tokens(config: dict) -> list[str]:
    """transformers' `all_special_tokens` from tokenizer_config.json: the named special tokens, then model-specific
    ones (other `*_token` keys holding a token, e.g. image_token, and those of an `extra_special_tokens` object),
    then `extra_special_tokens` (`additional_special_tokens` in older files) given as a list; each once."""
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    model_specific = [v for k, v in config.items() if k.endswith("_token") and k not in _NAMED_SPECIAL_TOKENS]
    if isinstance(extra, dict):
        model_specific, extra = model_specific + list(extra.values()), []
    tokens = [config.get(k) for k in _NAMED_SPECIAL_TOKENS] + model_specific + list(extra)
    contents = [_token_content(t) for t in tokens if isinstance(t, (str, dict))]
    return list(dict.fromkeys(c for c in contents if isinstance(c, str)))


def _unreadable(path: str, e: OSError) -> TokenizerError:
    """A tokenizer file that exists but cannot be read (e.g. permission denied), in one sentence naming it."""
    return TokenizerError(f"{path} cannot be read ({e.strerror or type(e).__name__}).")


_ADDED_TOKEN_FLAGS = ("special", "lstrip", "rstrip", "normalized", "single_word")  # an AddedToken's flags


def _check_config_fields(config: dict, config_file: str) -> None:
    """The tokenizer_config.json fields we read, of the shapes transformers writes; a hand-edited one of another
    shape was a KeyError / TypeError from deep inside."""
    def bad(field: str, want: str, got) -> TokenizerError:
        return TokenizerError(f"{config_file}: '{field}' must be {want}, got {got!r:.80}.")

    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(name)
        if value is not None and not isinstance(_token_content(value), str):
            raise bad(name, "a token string (or an object with a 'content' string)", value)
    added = config.get("added_tokens_decoder", {})
    if not isinstance(added, dict):
        raise bad("added_tokens_decoder", "an object of id -> token", added)
    for token_id, spec in added.items():
        if not str(token_id).isdigit() or not isinstance(spec, dict) or not isinstance(spec.get("content"), str):
            raise bad(f"added_tokens_decoder[{token_id!r}]", "keyed by a token id and hold a 'content' string", spec)
        for flag in _ADDED_TOKEN_FLAGS:  # "false", 0 / 1 or null went through bool(); transformers refuses them
            if flag in spec and not isinstance(spec[flag], bool):
                raise bad(f"added_tokens_decoder[{token_id!r}].{flag}", "true or false", spec[flag])
    if "split_special_tokens" in config and not isinstance(config["split_special_tokens"], bool):
        raise bad("split_special_tokens", "true or false", config["split_special_tokens"])
    template = config.get("chat_template")
    if template is not None and not isinstance(template, str) and not (
            isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                               and isinstance(t.get("template"), str) for t in template)):
        raise bad("chat_template", "a Jinja template string or a list of {'name', 'template'} objects", template)


def _check_added_tokens(backend: _Backend, added_tokens_decoder: dict, path: str) -> None:
    # tokenizer.json normally lists these already; add any it lacks, at the id tokenizer_config.json promises
    for token_id, spec in sorted(added_tokens_decoder.items(), key=lambda kv: int(kv[0])):
        content = spec["content"]
        if backend.token_to_id(content) is None:
            # with the entry's own flags, as transformers builds it (`AddedToken(**entry)`): lstrip / rstrip eat the
            # spaces beside it, normalized matches it after NFC, single_word only as a whole word
            flags = {k: spec[k] for k in _ADDED_TOKEN_FLAGS if k in spec}
            backend.add_tokens([AddedToken(content, **flags)])
        if backend.token_to_id(content) != int(token_id):
            raise TokenizerError(
                f"tokenizer_config.json in {path!r} gives {content!r} id {token_id} but tokenizer.json gives "
                f"{backend.token_to_id(content)}; the two files are from different tokenizers."
            )


def bad_word_ids(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    """SamplingParams.bad_words -> the token sequences to keep out of the output, as vLLM builds them: each word as it
    tokenizes at the start of a text, and also after a space when the space merges into its first token (a word in
    mid-text; where the space is a token of its own, the first form already covers it)."""
    out = []
    for word in words:
        plain = tokenizer.encode(word.lstrip())
        spaced = tokenizer.encode(" " + word.lstrip())
        out.append(plain)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


class IncrementalDetokenizer:
    """Streams text for generated ids, holding back a character whose UTF-8 bytes are split across tokens (until
    more bytes arrive, or `flush` at the request's end).

    Keeps a short window of ids: `_ids[:_read]` was already turned into text (left context), `_ids[_read:]` is
    pending. Each `add` decodes the window with and without the pending ids and emits the difference, unless it
    ends in U+FFFD (an incomplete character: wait for more bytes). Cost per step is O(window), not O(sequence).
    """

    PROMPT_CONTEXT = 5  # prompt ids kept as left context, as vLLM does

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-self.PROMPT_CONTEXT :])
        if self._decode(context).endswith("\ufffd"):
            # a prompt cut mid-character would let output bytes complete it and shift the text offsets below
            context = []
        self._ids = context
        self._read = len(context)
        self._text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Append generated ids; return only the text that became final with them (possibly ""). final: nothing
        follows, so held-back bytes are final too (`flush`)."""
        self._ids.extend(token_ids)
        prefix = self._decode(self._ids[: self._read])
        full = self._decode(self._ids)
        if len(full) <= len(prefix) or full.endswith("\ufffd") and not final:
            return ""
        delta = full[len(prefix) :]
        # the ids just emitted become the next step's context; their start and end are character boundaries
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._text += delta
        return delta

    def flush(self) -> str:
        """At the request's end: the text still held back, as `decode` shows it (a character cut off by the length
        limit, or bytes that never form one, become U+FFFD, as in HF's decode of the output)."""
        return self.add([], final=True)

    @property
    def text(self) -> str:
        """All output text emitted so far (held-back bytes excluded until flush)."""
        return self._text


# ---------------------------------------------------------------------------------------------------------------
# A tiny Qwen-style tokenizer for tests and tiny checkpoints.

# Qwen2/3's pre-tokenizer split (as in transformers' Qwen2Tokenizer): digits one by one, letters with one leading
# non-letter, punctuation runs, newline runs. With NFC in front, this is the pipeline transformers rebuilds for
# `tokenizer_class: Qwen2Tokenizer`, so our files load to the same ids in both libraries.
_QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen3.5's: combining marks (\p{M}: Devanagari vowel signs, Thai tone marks, Arabic harakat, VS16) belong to words
_QWEN35_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _byte_level_pre_tokenizer(split: str, add_prefix_space: bool = False) -> pre_tokenizers.PreTokenizer:
    """Qwen's pre-tokenizer: the regex split, then bytes as printable characters."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)])


_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CHAT_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small engine reads a prompt, splits it into tokens, and writes one
new token at a time. Each step looks at what came before and picks the next word.

Language models are trained on a great deal of text: books, news, forum posts and source code. The model does not
see letters or words but numbers, and a tokenizer is the thing that turns text into those numbers and back. Byte
pair encoding starts from single bytes and merges the pairs that appear most often, so common words end up as one
token while rare words, names and other languages are spelled out in pieces. "Is it always this wet?" she asked.
"Only in spring and autumn," he said, "and sometimes in summer." They walked to the station in the rain.

The meeting is on Monday, 12 March 2024 at 09:30. Please bring 3 copies of the report (pages 1-45) and $19.99 for
lunch. Call +1 (555) 010-2368 or write to team@example.com; the budget rose 7.5% to 1,250,000 in Q3.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 65536 3.14159 2.71828 -1 1e-6 0x1F.

def fibonacci(n: int) -> list[int]:
    values = [0, 1]
    for i in range(2, n):
        values.append(values[i - 1] + values[i - 2])
    return values[:n]

print({"name": "fibonacci", "arguments": {"n": 10}})  # -> [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } // SELECT name FROM users WHERE age >= 18;
"""

# Qwen3's ChatML template (system + tools, JSON tool calls, tool responses, <think> reasoning), lightly reformatted.
QWEN3_CHAT_TEMPLATE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        '<args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{#- The last real user query: reasoning is kept only for the assistant turns after it. #}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' and message.content is string
          and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n'
                + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if not loop.first or content %}
                {{- '\n' }}
            {%- endif %}
            {%- set call = tool_call.function if tool_call.function else tool_call %}
            {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
            {{- call.arguments if call.arguments is string else call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""


def train_tiny_tokenizer(out_dir: str, vocab_size: int = 512) -> int:
    """Train a byte-level BPE tokenizer on a small built-in corpus and write a Qwen-style tokenizer to `out_dir`.

    Writes tokenizer.json and tokenizer_config.json (ChatML chat template, Qwen's special tokens after the
    `vocab_size` base ids). Every byte sequence stays encodable. Deterministic. Returns base + added vocab size.
    """
    if vocab_size < 256:
        raise TokenizerError(f"vocab_size={vocab_size} is too small; byte-level BPE needs at least the 256 bytes.")
    backend = _Backend(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _byte_level_pre_tokenizer(_QWEN_SPLIT)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in _CHAT_TOKENS])

    os.makedirs(out_dir, exist_ok=True)
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    added_tokens_decoder = {
        str(backend.token_to_id(t)): {"content": t, **flags, "special": t in _SPECIAL_TOKENS}
        for t in _SPECIAL_TOKENS + _CHAT_TOKENS
    }
    config = {  # the keys and values of a real Qwen3 tokenizer_config.json
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "chat_template": QWEN3_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return backend.get_vocab_size(with_added_tokens=True)
