"""What `LLM.generate` and the streaming API return (vLLM's field names).

Logprobs are log-softmax of the raw model logits (before penalties, temperature, top-k/p/min-p): each position
is a dict token id -> Logprob holding the chosen token and the top k.
"""
from dataclasses import dataclass, field


class Logprob(float):
    """A token's logprob: the float itself, with vLLM's Logprob fields beside it: `.logprob` (the same float),
    `.rank` (1 = the most likely token; the chosen token's rank over the whole vocabulary, a top-k entry's by its
    place) and `.decoded_token` (the token's text, None without a tokenizer)."""

    __slots__ = ("rank", "decoded_token")

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None):
        obj = super().__new__(cls, logprob)
        obj.rank, obj.decoded_token = rank, decoded_token
        return obj

    @property
    def logprob(self) -> float:
        return float(self)

    def __reduce__(self):
        return Logprob, (float(self), self.rank, self.decoded_token)


Logprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int]
    logprobs: list[Logprobs] | None  # one dict per generated token when SamplingParams.logprobs is set
    finish_reason: str | None  # "stop" (EOS, stop token or stop string), "length", "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it, if any
    cumulative_logprob: float | None = None
    # What is new since the previous output of this request (streaming). While running, the text that could still
    # turn out to be the start of a stop string is held back (from `text` too: it is the deltas so far), unless
    # include_stop_str_in_output is set (a stop string is then never cut from the text).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    lora_request: None = None  # vLLM's; always None (no LoRA adapters run here)

    def finished(self) -> bool:
        """Whether this sample has ended (vLLM's method: a finish_reason is set)."""
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When a request reached the engine, got its first token and finished: seconds on the `time.perf_counter`
    clock of the engine's process (differences are what mean something: TTFT = first_token_time - arrival_time)."""
    arrival_time: float
    first_token_time: float | None = None  # end of the step that sampled the first token (of sample 0)
    finished_time: float | None = None  # end of the step after which every sample was finished


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[Logprobs | None] | None  # first position None, then one dict per prompt token
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed (vLLM's field)
    # vLLM's fields for encoder-decoder models and LoRA; Qwen3.5 is decoder-only and runs no adapters, so always None
    encoder_prompt: str | None = None
    encoder_prompt_token_ids: list[int] | None = None
    lora_request: None = None
