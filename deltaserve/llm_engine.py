"""`LLM.llm_engine`: the engine under an LLM, with the methods of vLLM's LLMEngine that code written for vLLM calls
(`llm.llm_engine.get_tokenizer()`, `.model_config.max_model_len`, a hand-driven add_request / step loop). A view:
it holds no state of its own, every call goes to the LLM's engine, so it and LLM.generate / generate_stream share
the same requests."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import ModelConfig
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .hf_tokenizer import HFTokenizer

if TYPE_CHECKING:
    from .llm import LLM


@dataclass(frozen=True)
class EngineModelConfig:
    """The fields of vLLM's ModelConfig that scripts read, with the same names and meanings."""
    model: str | None  # the checkpoint directory (None: random weights, LLM.from_config)
    tokenizer: str | None  # the tokenizer directory (None: no tokenizer)
    dtype: torch.dtype  # the dtype the weights run in
    max_model_len: int  # the longest sequence (prompt + output) a request may reach
    hf_config: ModelConfig  # config.json, read once (num_hidden_layers, hidden_size, vocab_size, ... by HF's names)

    def get_vocab_size(self) -> int:
        """Rows of the embedding / logits (vLLM's: the model's vocab_size, not the tokenizer's)."""
        return self.hf_config.vocab_size


class LLMEngine:
    """vLLM's LLMEngine methods over an LLM's engine."""

    def __init__(self, llm: LLM, model: str | None, tokenizer: str | None):
        self._llm = llm
        self.model_config = EngineModelConfig(model, tokenizer, llm.dtype, llm.max_model_len, llm.config)

    @property
    def tokenizer(self) -> HFTokenizer | None:
        return self._llm.get_tokenizer()

    def get_tokenizer(self) -> HFTokenizer | None:
        """The LLM's get_tokenizer(): transformers' surface (None for a model without tokenizer.json)."""
        return self._llm.get_tokenizer()

    def get_model_config(self) -> EngineModelConfig:
        return self.model_config

    def add_request(self, request_id: str, prompt, params: SamplingParams, arrival_time: float | None = None,
                    lora_request=None, priority: int = 0) -> None:
        """Queue one prompt (a string, {'prompt': str} or {'prompt_token_ids': [...]}) under `request_id`; its outputs
        come from step(). Raises ValueError for a prompt or parameters that cannot run, or an id already in use.
        arrival_time: when the request arrived, time.time() seconds as in vLLM (None: now); its outputs' metrics
        count from it (on their time.perf_counter clock). lora_request and priority: vLLM's, at their defaults only
        (None, 0)."""
        from .llm import _check_vllm_request_args, _normalise_params, _normalise_prompts  # llm.py imports this

        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {request_id!r}")
        _check_vllm_request_args(lora_request, None)
        if not (isinstance(priority, int) and not isinstance(priority, bool)) or priority != 0:
            raise ValueError(f"priority={priority!r}: deltaserve schedules requests first come, first served (leave "
                             f"priority out, or pass 0)")
        if arrival_time is not None and (isinstance(arrival_time, bool) or not isinstance(arrival_time, (int, float))
                                         or not math.isfinite(arrival_time)):
            raise ValueError(f"arrival_time must be None or a time.time() timestamp (seconds), got {arrival_time!r}")
        llm = self._llm
        llm._check_usable()
        items = _normalise_prompts(prompt)
        if len(items) != 1:
            raise ValueError(f"add_request takes one prompt, got {len(items)}; call it once per prompt")
        (params,) = _normalise_params(params, 1, llm.get_default_sampling_params())
        item = items[0]
        arrival = None if arrival_time is None else time.perf_counter() - (time.time() - arrival_time)
        llm.engine.add_request(llm._encode(item), params, prompt=item if isinstance(item, str) else item.get("prompt"),
                               request_id=request_id, arrival_time=arrival)

    def step(self) -> list[RequestOutput]:
        """Run one engine step -> an output for every request added here that made progress in it (those of an
        open LLM.generate_stream go to that stream, as when any other call steps the engine)."""
        llm = self._llm
        llm._check_usable()
        return llm._deliver(llm._step())

    def has_unfinished_requests(self) -> bool:
        return self._llm.engine.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self._llm.engine.groups)

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Abort these requests now (ids not running are ignored, as in vLLM)."""
        for rid in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            self._llm.abort(rid)

    def reset_prefix_cache(self) -> None:
        self._llm.reset_prefix_cache()
