"""Structured outputs: constrain a request's tokens to a JSON schema, any JSON object, a regex or a list of choices.

The grammar engine is xgrammar (an optional dependency: `pip install 'deltaserve[structured]'`), imported only when a
request asks for structured output. `GrammarBackend` (one per engine) builds xgrammar's view of the vocabulary once,
compiles each distinct spec once (LRU-cached: the same schema sent again costs nothing) and hands each request sample a
`RequestGrammar`. Per step, the sampling batch asks every sampled row with a live grammar for its allowed tokens
(`RequestGrammar.fill`: a packed bitmask, bit t % 32 of word t // 32 set when token t may come next) and the sampler
masks the others to -inf; when the engine reads a sampled token it advances the grammar (`accept`). A request whose
grammar is complete (it accepted EOS) stops with finish_reason "stop". Such steps are read before the next one is
scheduled, as for penalties: the next mask needs the token just sampled. Special tokens (`<|im_start|>`, ...) never
occur inside constrained text: the detokenizer would drop them from the answer.

Reasoning models: with `start_after` (the `</think>` token id when the prompt opens a thinking block), the grammar
only applies once that token has been generated, so the model reasons freely and the answer is constrained.
"""
from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING

import torch

from ..sampling_params import StructuredOutputs

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

INSTALL_HINT = "pip install 'deltaserve[structured]'"


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError(f"structured outputs need the xgrammar package: {INSTALL_HINT}") from None
    return xgrammar


class GrammarBackend:
    """Compiles StructuredOutputs specs for one model: its tokenizer (byte-level BPE), vocabulary size (the logits'
    width, which may exceed the tokenizer's) and EOS ids (what completes a grammar)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, sorted(eos_token_ids)
        self._compile_key = functools.lru_cache(maxsize=64)(self._compile_uncached)  # per engine, not per class

    @functools.cached_property
    def _compiler(self):
        xgr = _xgrammar()
        # special tokens as "": never part of constrained text (the detokenizer would drop them); EOS still ends it
        special = self.tokenizer.special_token_ids
        vocab = ["" if i in special else self.tokenizer.id_to_token(i) or "" for i in range(self.tokenizer.vocab_size)]
        info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=self.vocab_size,
                                 stop_token_ids=self.eos_token_ids)
        return xgr.GrammarCompiler(info)

    def compile(self, spec: StructuredOutputs):
        """The compiled grammar of `spec` (cached); ValueError (one sentence) for a spec that does not compile."""
        return self._compile_key(_key(spec))

    def grammar(self, spec: StructuredOutputs, start_after: int | None = None) -> RequestGrammar:
        """A fresh grammar state for one request sample."""
        json_kind = spec.json_object or spec.json is not None
        return RequestGrammar(_xgrammar().GrammarMatcher(self.compile(spec)), start_after, self.eos_token_ids,
                              self._json_safe if json_kind else None)

    @functools.cached_property
    def _json_safe(self) -> torch.Tensor:
        """int32 [words] packed mask of the tokens free of the control bytes 0x00-0x1f but newline and carriage
        return, which a JSON string never holds raw. xgrammar 0.2.9's rule for a string with minLength / maxLength
        lets them through (byte 0x1f passed `{"type": "string", "maxLength": 5}`), and such text fails every JSON
        parser; a JSON grammar's mask is ANDed with this one."""
        # byte-level BPE spells byte b < 33 as chr(256 + b) (GPT-2's bytes_to_unicode). Tab goes too: allowed between
        # JSON tokens, but such a string takes it raw as well (newline and carriage return it refuses)
        banned = {chr(256 + b) for b in range(32) if b not in (10, 13)}
        mask = torch.full(((self.vocab_size + 31) // 32,), -1, dtype=torch.int32)
        for i in range(self.tokenizer.vocab_size):
            if not banned.isdisjoint(self.tokenizer.id_to_token(i) or ""):
                mask[i // 32] &= ~_word_bit(i)
        return mask

    def _compile_uncached(self, key: tuple[str, str]):
        kind, text = key
        compiler = self._compiler
        what = {"json_object": "JSON object", "json": "JSON schema", "regex": "regex", "choice": "choice list"}[kind]
        if kind == "json" and (problem := _unenforced_feature(text)) is not None:
            raise ValueError(f"structured output: the JSON schema uses {problem}, which the grammar engine does not "
                             f"enforce; drop it or check the answer yourself")
        try:
            if kind == "json_object":
                compiled = compiler.compile_json_schema('{"type": "object"}')
            elif kind == "json":
                compiled = compiler.compile_json_schema(text)
            else:
                compiled = compiler.compile_regex(text)  # regex, and choice as an alternation of escaped literals
        except Exception as e:  # noqa: BLE001 - xgrammar raises several types for a bad schema / regex
            raise ValueError(f"structured output: the {what} does not compile: {_reason(e)}") from None
        first = torch.empty((1, (self.vocab_size + 31) // 32), dtype=torch.int32)
        _xgrammar().GrammarMatcher(compiled).fill_next_token_bitmask(first, 0)
        if not first.any():  # e.g. the regex [^\s\S]: it compiles, but no token can start it
            raise ValueError(f"structured output: the {what} matches no text the model can write")
        return compiled


def _reason(e: Exception) -> str:
    """xgrammar's message without its C++ location and check prefix: '[12:56:07] /x.cc:94: Check failed: ... is
    false: Failed to parse JSON ...' -> 'Failed to parse JSON ...'."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
    return re.sub(r"^Check failed: .*? is false: ", "", text).rstrip(".")


# JSON Schema keywords xgrammar (0.2.9) compiles without enforcing them: the output could break the schema while the
# request reports "stop". Checked by feeding the compiled grammar an instance that violates each one.
_UNENFORCED = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "minContains",
               "maxContains")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "contains", "propertyNames", "unevaluatedProperties",
               "unevaluatedItems")


def _unenforced_feature(text: str) -> str | None:
    """The first keyword of the schema `text` that would compile but not be enforced (named for the error), else
    None. Text that is not JSON is left to the compiler's own error."""
    try:
        schema = json.loads(text)
    except ValueError:
        return None
    return _unenforced_in(schema, "the schema")


# xgrammar compiles 'oneOf' as 'anyOf': an answer matching two of its schemas passes. That is the same thing when no
# value can match two of them, as in a tagged union (each schema an object whose required tag has its own const) or
# schemas of different JSON types; such a oneOf is accepted, any other is refused.
_NUMBER_TYPES = {"integer", "number"}


def _overlapping_one_of(schema: dict, root) -> bool:
    """Whether `schema` has a 'oneOf' of two or more schemas not provably disjoint (_disjoint)."""
    branches = schema.get("oneOf")
    if not isinstance(branches, list) or len(branches) < 2:
        return False
    branches = [_resolve(b, root) for b in branches]
    return not all(_disjoint(a, b, root) for i, a in enumerate(branches) for b in branches[i + 1:])


def _resolve(schema, root, depth: int = 8):
    """A local '$ref' ('#/$defs/Name', '#/definitions/Name') -> the schema it names; anything else as it is."""
    while depth and isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and \
            schema["$ref"].startswith("#/"):
        node = root
        for part in schema["$ref"][2:].split("/"):
            node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return schema
        schema, depth = node, depth - 1
    return schema


def _disjoint(a, b, root, depth: int = 8) -> bool:
    """True only when no JSON value can match both schemas: their types, or their const / enum values, do not
    meet, or both are objects requiring one property whose schemas are disjoint (a tagged union's tag; looked for
    `depth` objects deep, which also ends a recursive schema's search)."""
    if not (isinstance(a, dict) and isinstance(b, dict)) or depth == 0:
        return False
    types_a, types_b = _types(a), _types(b)
    if types_a is not None and types_b is not None:
        if not types_a & types_b and not (_NUMBER_TYPES & types_a and _NUMBER_TYPES & types_b):
            return True
    values_a, values_b = _values(a), _values(b)
    if values_a is not None and values_b is not None and not values_a & values_b:
        return True
    if types_a == {"object"} == types_b:
        props_a, props_b = a.get("properties") or {}, b.get("properties") or {}
        shared = _required(a) & _required(b)
        return any(name in props_a and name in props_b and
                   _disjoint(_resolve(props_a[name], root), _resolve(props_b[name], root), root, depth - 1)
                   for name in shared)
    return False


def _required(schema: dict) -> set[str]:
    required = schema.get("required")
    return {name for name in required if isinstance(name, str)} if isinstance(required, list) else set()


def _types(schema: dict) -> set[str] | None:
    """The JSON types `schema` allows when it says (type, const or enum), else None (any)."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list) and all(isinstance(k, str) for k in kind):
        return set(kind)
    values = _listed(schema)
    return None if values is None else {_json_type(v) for v in values}


def _values(schema: dict) -> set | None:
    """The values `schema` allows when it lists them (const / enum), keyed as JSON compares them, else None."""
    values = _listed(schema)
    return None if values is None else {_json_key(v) for v in values}


def _listed(schema: dict) -> list | None:
    """The values a const or an enum lists, else None."""
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    return values if isinstance(values, list) else None


def _json_key(value):
    """A hashable key equal for values JSON Schema calls equal: 1 and 1.0 alike, also inside arrays and objects
    (true and 1 differ)."""
    kind = _json_type(value)
    if kind in _NUMBER_TYPES:
        return "number", float(value)
    if kind == "array":
        return "array", tuple(_json_key(v) for v in value)
    if kind == "object":
        return "object", tuple(sorted((str(k), _json_key(v)) for k, v in value.items()))
    return kind, value


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "null")


def _unenforced_in(schema, where: str, root=None) -> str | None:
    """root: the whole schema, which local '$ref's point into (None: `schema` is the root)."""
    root = schema if root is None else root
    if not isinstance(schema, dict):
        return None
    for key in _UNENFORCED:
        if key in schema:
            return f"'{key}' (in {where})"
    if schema.get("uniqueItems") is True:
        return f"'uniqueItems' (in {where})"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return f"'allOf' with {len(schema['allOf'])} schemas (in {where})"
    if missing := _undefined_required(schema):
        return f"'required' naming {missing[0]!r}, which 'properties' does not define (in {where})"
    if _overlapping_one_of(schema, root):
        return f"'oneOf' whose schemas one answer could match together (in {where}; only 'anyOf' is enforced)"
    for name, sub in _subschemas(schema):
        if (problem := _unenforced_in(sub, name, root)) is not None:
            return problem
    return None


def enforceable_schema(schema, root=None):
    """`schema` without what _unenforced_in refuses (a copy): what the grammar enforces of it, for a schema the
    client did not ask to be held to (a tool's parameters under a forced tool choice; OpenAI's non-strict tool
    calls promise no more). An overlapping 'oneOf' becomes the 'anyOf' it is compiled as."""
    root = schema if root is None else root
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k not in _UNENFORCED}
    if _overlapping_one_of(out, root):
        one_of = out.pop("oneOf")
        out.setdefault("anyOf", one_of)  # beside an anyOf of its own: dropped
    if out.get("uniqueItems") is True:
        del out["uniqueItems"]
    if isinstance(out.get("allOf"), list) and len(out["allOf"]) > 1:
        del out["allOf"]
    if missing := _undefined_required(out):
        out["required"] = [name for name in out["required"] if name not in missing]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: enforceable_schema(sub, root) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [enforceable_schema(sub, root) for sub in out[key]]
    for key in _SUBSCHEMAS:
        if key in out:
            out[key] = enforceable_schema(out[key], root)
    return out


def _undefined_required(schema: dict) -> list:
    """Names in `required` that `properties` lacks (xgrammar does not make the object hold them, not even one that
    `patternProperties` matches). A `required` that is not a list (draft 3's `"required": true` on a property)
    names nothing."""
    required = schema.get("required")
    if not isinstance(required, list):
        return []
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    return [name for name in required if isinstance(name, str) and name not in props]


def _subschemas(schema: dict) -> list[tuple[str, object]]:
    """(where, subschema) of every schema nested one level in `schema`."""
    children = [(f"{key}.{name}", sub) for key in _SUBSCHEMA_MAPS if isinstance(schema.get(key), dict)
                for name, sub in schema[key].items()]
    children += [(f"{key}[{i}]", sub) for key in _SUBSCHEMA_LISTS if isinstance(schema.get(key), list)
                 for i, sub in enumerate(schema[key])]
    return children + [(key, schema[key]) for key in _SUBSCHEMAS if key in schema]


def _key(spec: StructuredOutputs) -> tuple[str, str]:
    """A hashable (kind, text) for the compile cache. A schema dict keeps its key order: xgrammar writes an object's
    properties in the order the schema lists them."""
    if spec.json_object:
        return "json_object", ""
    if spec.json is not None:
        if isinstance(spec.json, str):
            return "json", spec.json
        try:
            return "json", json.dumps(spec.json)
        except (TypeError, ValueError) as e:  # e.g. a set, or another object JSON cannot hold
            raise ValueError(f"structured output: the JSON schema is not JSON ({e})") from None
    if spec.regex is not None:
        return "regex", spec.regex
    return "choice", "|".join(_regex_literal(c) for c in spec.choice)


def _word_bit(t: int) -> int:
    """Token t's bit as the value of its int32 word in a packed mask (bit 31 is the sign)."""
    return (1 << (t % 32)) - (1 << 32 if t % 32 == 31 else 0)


def _regex_literal(text: str) -> str:
    return "".join("\\" + ch if ch in "\\^$.|?*+()[]{}" else ch for ch in text)


class RequestGrammar:
    """One request sample's position in its grammar."""

    def __init__(self, matcher, start_after: int | None, eos_token_ids: list[int],
                 allowed: torch.Tensor | None = None):
        self.matcher = matcher
        self.allowed = allowed  # int32 [words]: tokens the grammar may allow at all (GrammarBackend._json_safe)
        self.active = start_after is None  # false until start_after has been generated
        self.start_after = start_after
        self.eos_token_ids = eos_token_ids
        self.dead_end = False  # the text so far has no continuation the grammar accepts (see fill)

    @property
    def constrains(self) -> bool:
        """Whether the next token is constrained (the grammar is live and not yet complete)."""
        return self.active and not self.matcher.is_terminated()

    def accept(self, token_id: int) -> bool:
        """Advance by a generated token -> whether the grammar is now complete (the request should stop; at a dead
        end it should too, with dead_end set)."""
        if not self.active:
            self.active = token_id == self.start_after
            return False
        if self.dead_end:
            return True
        if not self.matcher.accept_token(token_id):  # the mask allowed it, so only a mismatched backend gets here
            raise RuntimeError(f"token {token_id} was sampled outside its request's grammar")
        return self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this grammar's allowed next tokens into row `row` of an int32 [N, words] CPU bitmask. A grammar
        can reach a state no token continues (the regex a[^\\s\\S] after "a"): with nothing allowed the row was
        sampled anyway, the token failed `accept` and the error ended every request of the step. There the row
        allows EOS only and the request ends (dead_end; the engine reports finish_reason "abort")."""
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.allowed is not None:
            bitmask[row] &= self.allowed
        if not bitmask[row].any():
            self.dead_end = True
            for t in self.eos_token_ids:
                if t // 32 < bitmask.shape[1]:  # a configured EOS id past the logits' width cannot be sampled
                    bitmask[row, t // 32] |= _word_bit(t)
