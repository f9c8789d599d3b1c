"""What `llm.get_tokenizer()` returns: deltaserve's Tokenizer under transformers' names, defaults and results.

vLLM's get_tokenizer() hands a script the Hugging Face tokenizer itself, so ported scripts call `tokenizer(text)`,
`decode(ids)` (special tokens kept), `apply_chat_template(messages)` (token ids: a dict of `input_ids` and
`attention_mask` in transformers 5), `convert_tokens_to_ids`, `eos_token_id` ... HFTokenizer answers those calls as
transformers' tokenizer of a Qwen3.5 checkpoint does, over the engine's own Tokenizer (same backend, same chat
template, a template set later included). The engine, server and CLI keep using that Tokenizer and its own defaults
(decode skips special tokens, apply_chat_template renders text). A transformers keyword that would change a result
and is not implemented here (padding, truncation, text pairs, ...) is refused in one sentence, not ignored.
"""
from __future__ import annotations

from .tokenizer import Tokenizer, TokenizerError

# transformers' keywords of __call__ / encode that deltaserve does not implement, with the values that mean "off"
# (transformers' default first): given at one of those they change nothing, so a script spelling them out still runs
_ENCODE_OFF = {
    "text_pair": (None,), "text_target": (None,), "text_pair_target": (None,), "padding": (False, "do_not_pad"),
    "truncation": (None, False, "do_not_truncate"), "max_length": (None,), "stride": (0,),
    "is_split_into_words": (False,), "pad_to_multiple_of": (None,), "padding_side": (None,),
    "return_token_type_ids": (None, False), "return_overflowing_tokens": (False,),
    "return_special_tokens_mask": (False,), "return_offsets_mapping": (False,), "return_length": (False,),
    "verbose": (True, False), "tokenizer_kwargs": (None,),
}
_CHAT_OFF = {"sanitize_control_tokens": (False,), "padding": (False, "do_not_pad"),
             "truncation": (False, None, "do_not_truncate"), "max_length": (None,),
             "return_assistant_tokens_mask": (False,), "tokenizer_kwargs": (None,)}


def _refuse_unsupported(method: str, given: dict, off: dict) -> None:
    """given: the keywords a caller passed to `method` beyond those implemented; each must be one transformers
    knows (else a TypeError, as Python's own) and at a value in `off` (else one sentence saying so)."""
    for name, value in given.items():
        if name not in off:
            raise TypeError(f"{method}() got an unexpected keyword argument {name!r}")
        if not any(value is v or type(value) is type(v) and value == v for v in off[name]):
            raise TokenizerError(f"{method}({name}={value!r:.40}) is not supported by deltaserve's tokenizer; "
                                 f"leave {name} at {off[name][0]!r} (transformers' default).")


class BatchEncoding(dict):
    """transformers' BatchEncoding for what deltaserve returns: a dict of `input_ids` and `attention_mask` (lists,
    or [B, T] int64 tensors for return_tensors="pt"), readable as attributes too (`enc.input_ids`)."""

    @property
    def input_ids(self):
        return self["input_ids"]

    @property
    def attention_mask(self):
        return self["attention_mask"]


def _token_ids(ids) -> list:
    """int, a list (of lists), a tuple, a torch tensor or a numpy array of ids -> plain Python ints / lists."""
    return ids.tolist() if hasattr(ids, "tolist") else list(ids) if isinstance(ids, tuple) else ids


class HFTokenizer:
    """transformers' tokenizer surface over deltaserve's Tokenizer (see the module docstring); deltaserve's own
    members (token_to_id, id_to_token, set_chat_template, ...) are here too."""

    is_fast = True
    padding_side = "right"  # transformers' default; padding itself is not implemented (refused)

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    # ---- text <-> ids, with transformers' defaults ----
    def __call__(self, text, *, add_special_tokens: bool = True, return_tensors: str | None = None,
                 return_attention_mask: bool | None = None, **hf_kwargs) -> BatchEncoding:
        """text: a string, or a list of strings (a batch) -> {"input_ids", "attention_mask"} as transformers gives
        them: lists ([T], or [B][T] for a batch), or [1, T] / [B, T] tensors for return_tensors="pt"."""
        _refuse_unsupported("tokenizer", hf_kwargs, _ENCODE_OFF)
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        if not all(isinstance(t, str) for t in texts):
            raise TokenizerError("tokenizer(text) takes a string or a list of strings (pre-tokenized words and "
                                 "token ids are not supported).")
        ids = [self._tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        enc = BatchEncoding(input_ids=ids if batched else ids[0])
        if return_attention_mask is not False:
            enc["attention_mask"] = [[1] * len(i) for i in ids] if batched else [1] * len(ids[0])
        return _as_tensors(enc, return_tensors, batched)

    def encode(self, text: str, text_pair=None, add_special_tokens: bool = True, *, return_tensors: str | None = None,
               **hf_kwargs):
        """text -> ids (a [1, T] tensor for return_tensors="pt"); add_special_tokens=True as in transformers (a
        Qwen tokenizer adds none either way)."""
        _refuse_unsupported("encode", {"text_pair": text_pair, **hf_kwargs}, _ENCODE_OFF)
        if not isinstance(text, str):
            raise TokenizerError(f"encode(text) takes a string, got {type(text).__name__}.")
        return self(text, add_special_tokens=add_special_tokens, return_tensors=return_tensors,
                    return_attention_mask=False)["input_ids"]

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None):
        """ids (an int, a list, a 1-D tensor or array) -> text, special tokens kept unless skip_special_tokens, as
        transformers decodes; a list of lists (a 2-D tensor) -> a list of texts, as transformers 5 does.
        clean_up_tokenization_spaces: accepted and ignored, as transformers ignores it for a BPE tokenizer."""
        ids = _token_ids(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return self.batch_decode(ids, skip_special_tokens)
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """A list of id lists (or a 2-D tensor) -> their texts, special tokens kept unless skip_special_tokens."""
        return [self._tokenizer.decode(_token_ids(ids), skip_special_tokens=skip_special_tokens)
                for ids in _token_ids(sequences)]

    # ---- chat ----
    def apply_chat_template(self, conversation, tools: list | None = None, documents: list | None = None,
                            chat_template: str | None = None, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = True,
                            return_tensors: str | None = None, return_dict: bool = True,
                            chat_template_content_format: str = "auto", **kwargs):
        """transformers 5's apply_chat_template: tokenize=True (its default) gives the token ids, as a BatchEncoding
        of `input_ids` and `attention_mask` unless return_dict=False; tokenize=False the text.
        add_generation_prompt=False, as transformers. conversation: one list of messages, or a list of them (a
        batch: lists of texts / ids). chat_template_content_format is deltaserve's (vLLM's option); other keywords
        become template variables (e.g. enable_thinking=False)."""
        _refuse_unsupported("apply_chat_template", {k: kwargs.pop(k) for k in _CHAT_OFF if k in kwargs}, _CHAT_OFF)
        if continue_final_message not in (True, False):
            raise TokenizerError("continue_final_message must be True or False here (transformers' string form is "
                                 "not supported).")
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and \
            isinstance(conversation[0], (list, tuple))
        if documents is not None:
            kwargs["documents"] = documents
        texts = [self._tokenizer.apply_chat_template(
            c, add_generation_prompt=add_generation_prompt, tools=tools, tokenize=False,
            continue_final_message=continue_final_message, chat_template=chat_template,
            chat_template_content_format=chat_template_content_format, **kwargs)
            for c in (conversation if batched else [conversation])]
        if not tokenize:
            return texts if batched else texts[0]
        enc = self(texts if batched else texts[0], add_special_tokens=False, return_tensors=return_tensors)
        return enc if return_dict else enc["input_ids"]

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        return self._tokenizer.chat_template

    def set_chat_template(self, source: str) -> None:
        """deltaserve's: render every chat (the engine's too) with `source`; see Tokenizer.set_chat_template."""
        self._tokenizer.set_chat_template(source)

    def check_chat_template(self) -> None:
        self._tokenizer.check_chat_template()

    # ---- vocabulary ----
    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """A token -> its id (None if it is not in the vocabulary: Qwen has no unknown token); a list -> a list."""
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        """An id -> its token (byte-level spelling, e.g. 'Ġthe'); a list -> a list, without the special tokens if
        skip_special_tokens (a single id is converted whatever it is, as transformers does)."""
        ids = _token_ids(ids)
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        special = self._tokenizer.special_token_ids if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(i) for i in ids if i not in special]

    def get_vocab(self) -> dict[str, int]:
        """Every token -> its id, added tokens included."""
        return self._tokenizer.get_vocab()

    @property
    def vocab_size(self) -> int:
        """transformers' vocab_size: the base vocabulary, without the added tokens (len() counts those too)."""
        return self._tokenizer.base_vocab_size

    def __len__(self) -> int:
        return len(self._tokenizer)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    # ---- special tokens (tokenizer_config.json's) ----
    @property
    def bos_token(self) -> str | None:
        return self._tokenizer.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._tokenizer.special_tokens.get("eos_token")

    @property
    def unk_token(self) -> str | None:
        return self._tokenizer.special_tokens.get("unk_token")

    @property
    def pad_token(self) -> str | None:
        return self._tokenizer.special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tokenizer.token_to_id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return None if self.unk_token is None else self._tokenizer.token_to_id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._tokenizer.token_to_id(self.pad_token)

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens (bos, eos, unk, sep, pad, cls, mask, model-specific ones such as image_token),
        then the extra ones (additional_special_tokens), each once, in transformers' order."""
        return list(self._tokenizer.all_special_tokens)

    @property
    def all_special_ids(self) -> list[int | None]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def special_tokens(self) -> dict[str, str]:
        """deltaserve's: the special tokens chat templates see as variables ({'eos_token': '<|im_end|>', ...})."""
        return self._tokenizer.special_tokens

    @property
    def special_token_ids(self) -> set[int]:
        return self._tokenizer.special_token_ids

    @property
    def model_max_length(self) -> int:
        """tokenizer_config.json's model_max_length (transformers' int(1e30) when it has none)."""
        return self._tokenizer.model_max_length

    @property
    def name_or_path(self) -> str:
        """The tokenizer's folder, as the LLM was given it."""
        return self._tokenizer.name_or_path

    def __repr__(self) -> str:
        return f"HFTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, len={len(self)})"


def _as_tensors(enc: BatchEncoding, return_tensors: str | None, batched: bool) -> BatchEncoding:
    """enc's lists as [1, T] (one text) or [B, T] int64 tensors for return_tensors="pt"; enc itself for None."""
    if return_tensors is None:
        return enc
    if return_tensors != "pt":
        raise TokenizerError(f"return_tensors={return_tensors!r:.40} is not supported by deltaserve's tokenizer; "
                             "use 'pt' (torch) or None (lists).")
    rows = enc["input_ids"] if batched else [enc["input_ids"]]
    if len({len(r) for r in rows}) > 1:
        raise TokenizerError("return_tensors='pt' needs texts of one token length (padding is not supported); "
                             "leave return_tensors=None for lists.")
    import torch

    return BatchEncoding({k: torch.tensor(v if batched else [v], dtype=torch.long) for k, v in enc.items()})
