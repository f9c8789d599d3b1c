"""What `LLM.generate` and the streaming API return (vLLM's field names).

Logprobs are log-softmax of the raw model logits (before penalties, temperature, top-k/p/min-p): each position
is a dict token id -> logprob holding the chosen token and the top k.
"""
from dataclasses import dataclass, field

Logprobs = dict[int, float]


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
    # turn out to be the start of a stop string is held back.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)


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
