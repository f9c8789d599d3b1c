"""A request as the scheduler sees it: tokens known so far, tokens already in the caches, where its caches live."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, clipped so prompt + output fits max_model_len (1 for a prompt filling it)
    sample_index: int = 0  # which of the parent's n samples this is
    generator: Any = None  # torch.Generator of a seeded request, so its samples ignore the rest of the batch
    grammar: Any = None  # structured_output.RequestGrammar of a request with structured_outputs
    bad_word_ids: list[list[int]] = field(default_factory=list)  # params.bad_words tokenized (engine_core.bad_word_ids)
    fork_children: list["Request"] = field(default_factory=list)  # n > 1 siblings that copy this one's prefill
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV / state are in the caches
    num_inflight: int = 0  # 0 or 1: a token sampled by the step still running on the device, id not yet read
    block_ids: list[int] = field(default_factory=list)
    state_slot: int = -1
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens its first admission took from the prefix cache
    # Per-request outputs accumulated by the model runner and the output processor.
    prompt_logprobs: list = field(default_factory=list)  # dict per prompt position; [0] is None
    logprobs: list = field(default_factory=list)  # dict per output token
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens the scheduler may feed: the known ones plus the one in flight (its id is read on the device)."""
        return self.num_tokens + self.num_inflight

    @property
    def last_token_inflight(self) -> bool:
        """The token in flight is this request's last (max_tokens, which max_model_len clips): nothing to feed."""
        return self.num_inflight > 0 and len(self.output_token_ids) + self.num_inflight >= self.max_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 of prompt + output."""
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids[start:] if start < p else []) + self.output_token_ids[max(start - p, 0): end - p]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs still owed. Only sample 0 reports them: a forked sample re-prefilled after a preemption
        would compute (and drop) the whole prompt's."""
        return (self.params.prompt_logprobs is not None and self.sample_index == 0
                and len(self.prompt_logprobs) < self.num_prompt_tokens)
