"""Per-request sampling parameters, with vLLM's names, defaults and semantics.

Logprobs contract: every logprob deltaserve returns (``logprobs`` for generated tokens and ``prompt_logprobs``
for prompt tokens) is the log-softmax of the RAW model logits, taken before logit_bias, repetition/presence/frequency
penalties, temperature, top-k, top-p and min-p are applied. They therefore describe the model, not the sampling
distribution, and are the same for a token whatever sampling parameters the request used.

Validation happens once, here: a bad value raises ``ValueError`` with one sentence naming the field and the
allowed range, so an API user never sees a stack trace from inside the sampler.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import InitVar, dataclass, field

_GREEDY_EPS = 1e-5  # temperatures below this are treated as 0 (greedy), as in vLLM
_MIN_TEMP = 1e-2  # as vLLM's _MAX_TEMP: a temperature in (0, 0.01) samples at 0.01 (only 0 is greedy)


def truncated_prompt(ids: list[int], keep: int | None, max_model_len: int, max_tokens: int | None) -> list[int]:
    """A prompt's token ids as SamplingParams.truncate_prompt_tokens leaves them: the last `keep`; -1: as many as
    leave room for max_tokens (None: for one token; 0, the server's echo that only scores the prompt: all
    max_model_len, as vLLM's -1); None keeps all."""
    if keep is None:
        return ids
    keep = max(1, max_model_len - (1 if max_tokens is None else max_tokens)) if keep == -1 else keep
    return ids[-keep:] if len(ids) > keep else ids


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_finite(x) -> bool:
    return _is_number(x) and math.isfinite(x)


def _plain(x):
    """A numpy (or other numbers ABC) integer as an int and real as a float, and a 0-d numpy array or torch tensor as
    its Python number; anything else unchanged. Such scalars (`seed=rng.integers(...)`, a sweep's np.float32
    temperature, `temperature=torch.tensor(0.7)`) were refused as "must be an integer, got 3"."""
    if getattr(x, "ndim", None) == 0 and callable(getattr(x, "item", None)) and not isinstance(x, numbers.Number):
        x = x.item()  # a 0-d array / tensor: its int, float or bool (a bool stays one, and is refused as a number)
    if type(x) in (int, float) or isinstance(x, bool) or not isinstance(x, numbers.Real):
        return x
    return int(x) if isinstance(x, numbers.Integral) else float(x)


_NUMBER_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "seed", "logprobs",
                  "prompt_logprobs", "repetition_penalty", "presence_penalty", "frequency_penalty",
                  "truncate_prompt_tokens")


@dataclass(frozen=True)
class StructuredOutputs:
    """Constrain the generated text (vLLM's StructuredOutputsParams); set exactly one of: `json` (a JSON schema, as a
    dict or a JSON string), `json_object=True` (any JSON object), `regex`, or `choice` (the output is one of these
    strings). The request ends when the constrained text is complete. Needs the optional xgrammar package."""
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None

    def __post_init__(self) -> None:
        if self.json_object is None:  # vLLM's default for it
            object.__setattr__(self, "json_object", False)
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be true or false, got {self.json_object!r}.")
        kinds = [k for k in ("json", "regex", "choice") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object is True else []
        if len(kinds) != 1:
            raise ValueError(f"structured_outputs must set exactly one of json, json_object, regex or choice, "
                             f"got {kinds or 'none'}.")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (a dict or a string), got {self.json!r}.")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"structured_outputs.regex must be a non-empty string, got {self.regex!r}.")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"structured_outputs.choice must be a list of non-empty strings, got {self.choice!r}.")
            object.__setattr__(self, "choice", tuple(self.choice))


StructuredOutputsParams = StructuredOutputs  # vLLM's name (vllm.sampling_params.StructuredOutputsParams)


@dataclass
class SamplingParams:
    n: int = 1  # number of output sequences per prompt
    temperature: float = 1.0  # in [0, 2]; 0 = greedy (argmax of the penalised logits)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability mass reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens whose probability is below min_p * (max probability)
    max_tokens: int | None = 16  # None = generate until max_model_len
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled, nor stop strings end a request, before this many
    stop: str | list[str] | None = None  # stop strings; normalised to a (possibly empty) list
    stop_token_ids: list[int] = field(default_factory=list)  # extra token ids that end generation
    ignore_eos: bool = False  # keep generating past the EOS token
    seed: int | None = None  # per-request RNG seed: same seed, same tokens, whatever else is batched; -1 = None
    # number of top logprobs per generated token (sampled token always included); -1: the whole vocabulary, as vLLM
    # (True: 1, as vLLM)
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # number of top logprobs per prompt token; -1: the whole vocabulary; True: 1
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0  # subtracted once from every token present in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token in the output
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's; Qwen's byte-level (fast) tokenizer writes special tokens without added spaces either way, as HF's fast
    # tokenizers do, so False and True give the same text
    spaces_between_special_tokens: bool = True
    detokenize: bool = True  # False: no text (token ids only; stop strings need text)
    # token id -> added to that token's logit before sampling (greedy too), in [-100, 100] as in OpenAI's API:
    # -100 effectively bans a token, +100 all but forces it. Keys must lie in the model's vocabulary (checked when
    # the request is added).
    logit_bias: dict[int, float] | None = None
    # only these token ids can be sampled (vLLM's; applied as a structured output's mask, so not with one)
    allowed_token_ids: list[int] | None = None
    # words kept out of the output as vLLM does: the last token of each word's usual tokenizations (at the start of a
    # text and after a space) is banned whenever the output ends with the tokens before it (other tokens can still
    # spell the word)
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputs | None = None  # constrain the output to a JSON schema, a regex, ...
    # keep only the prompt's last k tokens (vLLM's left truncation); -1: as many as leave room for max_tokens
    truncate_prompt_tokens: int | None = None
    # vLLM's, taken only to refuse them with what to use instead (they were TypeErrors): per-request Python logits
    # processors (vLLM V1 refuses them too), and guided_decoding, vLLM's older name for structured_outputs
    logits_processors: InitVar[list | None] = None
    guided_decoding: InitVar[object | None] = None

    def __post_init__(self, logits_processors: list | None, guided_decoding: object | None) -> None:
        if logits_processors:
            raise ValueError("logits_processors (per-request Python callbacks) are not supported, as in vLLM V1: use "
                             "logit_bias, allowed_token_ids, bad_words or structured_outputs.")
        if guided_decoding is not None:
            raise ValueError("guided_decoding is vLLM's older name for structured_outputs: pass structured_outputs="
                             "StructuredOutputs(json=..., regex=..., choice=... or json_object=True), from "
                             "deltaserve.sampling_params.")
        self.check()

    def check(self) -> None:
        """Normalise and validate every field (ValueError, one sentence). Runs at construction and again when a
        request is added: a field set after construction (`params.n = 0`) used to fail deep inside the engine."""
        for name in _NUMBER_FIELDS:
            setattr(self, name, _plain(getattr(self, name)))
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}.")
        if _is_int(self.seed) and self.seed == -1:  # as vLLM: -1 asks for no seed (clients send it for "random")
            self.seed = None
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is True:  # as vLLM: True is 1 (the chosen token and the most likely one)
                setattr(self, name, 1)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):  # vLLM takes any collection
            raise ValueError(f"stop_token_ids must be a list of integers >= 0, got {self.stop_token_ids!r}.")
        self.stop_token_ids = [_plain(t) for t in self.stop_token_ids]
        if isinstance(self.allowed_token_ids, (list, tuple)):
            self.allowed_token_ids = [_plain(t) for t in self.allowed_token_ids]
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {_plain(t): _plain(b) for t, b in self.logit_bias.items()}
        if isinstance(self.bad_words, (str, tuple)):
            self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words)
        self._validate()
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))  # each id once, as vLLM
        if 0 < self.temperature < _MIN_TEMP:  # vLLM raises it so (logits / T would overflow); it stays a sampler
            self.temperature = _MIN_TEMP
        self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()} if self.logit_bias else None

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(msg)

        if not _is_int(self.n) or self.n < 1:
            fail(f"n must be an integer >= 1, got {self.n!r}.")
        if not _is_finite(self.temperature) or not 0 <= self.temperature <= 2:  # [0, 2]: vLLM's and OpenAI's range
            fail(f"temperature must be in [0, 2] (0 means greedy), got {self.temperature!r}.")
        if self.n > 1 and self.temperature == 0:  # as vLLM: n greedy samples would be n copies of one answer
            fail(f"n must be 1 when using greedy sampling (temperature 0), got n={self.n}: set a temperature > 0 to "
                 f"draw {self.n} different samples.")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if not _is_int(self.top_k) or self.top_k < -1:
            fail(f"top_k must be -1 or an integer >= 0 (0 or -1 disables it), got {self.top_k!r}.")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            fail(f"min_p must be in [0, 1], got {self.min_p!r}.")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            fail(f"max_tokens must be an integer >= 1 or None (until max_model_len), got {self.max_tokens!r}.")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            fail(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(f"min_tokens must be at most max_tokens, got min_tokens={self.min_tokens} and "
                 f"max_tokens={self.max_tokens}.")
        if not _is_finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail(f"repetition_penalty must be a finite number > 0 (1 disables it), got {self.repetition_penalty!r}.")
        for name, value in (("presence_penalty", self.presence_penalty),
                            ("frequency_penalty", self.frequency_penalty)):
            if not _is_number(value) or not -2 <= value <= 2:
                fail(f"{name} must be in [-2, 2], got {value!r}.")
        for name, value in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            if value is not None and (not _is_int(value) or value < -1):
                fail(f"{name} must be None, -1 (the whole vocabulary) or an integer >= 0, got {value!r}.")
        # request i of n draws from seed + i; torch takes seeds in [-2**63, 2**64)
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed <= 2**64 - self.n):
            fail(f"seed must be None or an integer from -2**63 to 2**64 - n, got {self.seed!r}.")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}.")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail(f"stop_token_ids must be a list of integers >= 0, got {self.stop_token_ids!r}.")
        if self.allowed_token_ids is not None and not (
                isinstance(self.allowed_token_ids, list) and self.allowed_token_ids
                and all(_is_int(t) and t >= 0 for t in self.allowed_token_ids)):
            fail(f"allowed_token_ids must be None or a non-empty list of integers >= 0, "
                 f"got {self.allowed_token_ids!r}.")
        if self.bad_words is not None and not (isinstance(self.bad_words, list)
                                               and all(isinstance(w, str) and w.strip() for w in self.bad_words)):
            fail(f"bad_words must be None or a list of words (non-blank strings), got {self.bad_words!r}.")
        if self.truncate_prompt_tokens is not None and not (
                _is_int(self.truncate_prompt_tokens) and (self.truncate_prompt_tokens >= 1
                                                          or self.truncate_prompt_tokens == -1)):
            fail(f"truncate_prompt_tokens must be None, -1 (as many as leave room for max_tokens) or an integer "
                 f">= 1, got {self.truncate_prompt_tokens!r}.")
        for name in ("skip_special_tokens", "spaces_between_special_tokens", "detokenize", "ignore_eos",
                     "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                fail(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.stop and not self.detokenize:
            fail("stop strings match text, which detokenize=False leaves out: use stop_token_ids.")
        if self.allowed_token_ids and self.structured_outputs is not None:
            fail("allowed_token_ids and structured_outputs cannot be combined: write the allowed outputs as a choice "
                 "or a regex.")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            fail(f"structured_outputs must be None or a StructuredOutputs, got {self.structured_outputs!r}.")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                fail(f"logit_bias must be None or a dict of token id -> bias, got {self.logit_bias!r}.")
            bad = next(((t, b) for t, b in self.logit_bias.items()
                        if not (_is_int(t) and t >= 0 and _is_number(b) and -100 <= b <= 100)), None)
            if bad is not None:
                fail(f"logit_bias must be a dict of token ids (integers >= 0) to biases in [-100, 100], "
                     f"got {bad[0]!r}: {bad[1]!r}.")

    def with_vocab_size(self, vocab_size: int) -> SamplingParams:
        """These params with logprobs / prompt_logprobs -1 (vLLM's "the whole vocabulary") spelled out as vocab_size:
        what the engine takes (self when neither is -1)."""
        whole = {name: vocab_size for name in ("logprobs", "prompt_logprobs") if getattr(self, name) == -1}
        return dataclasses.replace(self, **whole) if whole else self

    def clone(self) -> SamplingParams:
        """An independent copy (vLLM's method): changing the copy's lists or dicts leaves these params as they are."""
        return copy.deepcopy(self)

    @property
    def greedy(self) -> bool:
        """True when this request takes the argmax (temperature ~ 0)."""
        return self.temperature < _GREEDY_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0
