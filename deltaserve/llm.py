"""Offline API (vLLM conventions): `LLM(model=DIR).generate(prompts, sampling_params)` and `LLM.chat(messages)`."""
from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
import os
import re
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from .config import ConfigError, ModelConfig, QuantConfig, hub_id_hint
from .kernels.paged_attention import check_kv_cache_dtype
from .kernels.paged_attention.kv_quant import check_kv_cache_device
from .layers.fp8 import use_fp8_kernels
from .layers.linear import merge_projection_runs, use_int4_kernels, use_int4_mma_layout
from .layers.moe import fuse_shared_experts
from .llm_engine import LLMEngine
from .models.formats import RANDOM_AWQ_PATTERNS, awq_formats, tp_problems
from .models.weights import build_model, checkpoint_files, has_own_lm_head, load_weights, read_formats
from .outputs import RequestOutput
from .runtime.block_pool import BlockPool
from .runtime import prefix_cache
from .runtime.engine_core import EngineCore
from .runtime.scheduler import Scheduler
from .runtime.state_pool import StatePool
from .sampling_params import SamplingParams, _is_int, _plain
from .tiny import random_init_
from .hf_tokenizer import HFTokenizer
from .tokenizer import Tokenizer, TokenizerError
from .worker.distributed import SINGLE, TPGroup, TPWorkers, check_tp_size, init_group, rank_device, shard_config
from .worker.model_runner import ModelRunner, kv_bytes_per_block, profile_activation_bytes, state_bytes_per_slot

logger = logging.getLogger("deltaserve")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_BUDGET_BYTES = 2 << 30  # KV pool cap on CPU when num_kv_blocks is not given
DEFAULT_PREFIX_CACHE_SLOTS = 16  # snapshots the prefix cache holds (each one request's GDN states: ~50 MB at 9B)


@dataclass(frozen=True)
class RankSpec:
    """Everything one rank needs to build its model shard, caches and runner (picklable: sent to TP workers)."""
    config: ModelConfig  # the full model config
    weights_dir: str | None  # None: random weights (benchmarks)
    formats: dict[str, str] | None  # checkpoint module -> int4 format (models/formats.py); None: all 16-bit
    device: torch.device
    dtype: torch.dtype
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int | None  # None: the model's max_position_embeddings, lowered to what the KV cache holds
    block_size: int
    num_kv_blocks: int | None  # None: sized automatically (the smallest over ranks)
    gpu_memory_utilization: float
    seed: int
    enforce_eager: bool
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype) | "int8" | "int4" | "fp8"
    prefix_cache_slots: int = 0  # GDN state slots for the prefix cache's snapshots, after the requests' own

    def build_runner(self, tp: TPGroup, device: torch.device, on_loaded=lambda: None) -> ModelRunner:
        """Build rank tp.rank's model shard (loading only its rows of the checkpoint) and its runner. Every rank
        runs this at once: KV sizing, profiling and CUDA-graph capture are collective under TP."""
        torch.manual_seed(self.seed)
        if device.type == "cuda":
            # an LLM dropped while a reference cycle holds it (a traceback's frame, a hook on its objects) keeps its
            # weights and caches until the collector runs: give them back before this one loads and sizes its cache
            gc.collect()
            torch.cuda.empty_cache()
        cfg, local = self.config, shard_config(self.config, tp.world)
        model = build_model(cfg, device, self.dtype, tp, self.formats)
        if self.weights_dir is None:
            random_init_(model, self.seed)
        else:
            load_weights(model, cfg, self.weights_dir, progress=tp.rank == 0, rank=tp.rank, world=tp.world)
        if device.type == "cuda":
            use_int4_kernels(model)  # int4 -> the kernels' layouts (AWQ; K-packed where the group allows), once
            use_fp8_kernels(model)  # FP8 experts: gate and up stacked for the fused MoE, once
        # every device (CPU tests run the merged groups too), after the kernels' layouts so merged pieces agree on
        # them: one GEMM per run of same-format pieces of a fused projection instead of one per piece plus a cat
        merge_projection_runs(model)
        fuse_shared_experts(model)  # after the merge: a shared gate|up of one format is one Linear by then
        if device.type == "cuda":
            use_int4_mma_layout(model)  # plain int4 Linears: the tensor-core decode GEMV's layout, once merged
        on_loaded()
        state_dtype = DTYPES[cfg.state_dtype]
        max_len = self.max_model_len or cfg.max_position_embeddings
        num_blocks = self.num_kv_blocks or tp.min_int(_auto_kv_blocks(
            model, local, device, self.dtype, self.block_size, self.max_num_seqs, self.max_num_batched_tokens,
            self.gpu_memory_utilization, state_dtype, max_len, self.kv_cache_dtype, self.prefix_cache_slots))
        capacity = num_blocks * self.block_size
        if capacity < max_len:
            if self.max_model_len is not None:  # an explicit length the pool cannot hold: say so rather than stall
                raise ValueError(self.kv_too_small(num_blocks, device))
            if tp.rank == 0:
                logger.info("max_model_len lowered from %d to %d to fit the KV cache", max_len, capacity)
            max_len = capacity
        runner = ModelRunner(local, model, device, self.dtype, num_blocks, self.block_size, self.max_num_seqs,
                             state_dtype, self.max_num_batched_tokens, max_len, self.kv_cache_dtype,
                             self.prefix_cache_slots)
        if device.type == "cuda" and not self.enforce_eager:
            if local.is_moe and self.dtype != torch.bfloat16:
                # the sync-free grouped-GEMM MoE is bf16-only; the reference MoE syncs, which a graph cannot hold
                logger.info("CUDA graphs off: MoE in %s runs the per-expert reference path", self.dtype)
            else:
                runner.capture_cuda_graphs(self.max_num_seqs, max_len)
        if tp.rank == 0:
            logger.info("KV cache (%s): %d blocks x %d tokens = %d tokens (%.2f GiB%s); %d GDN state slots (%.2f GiB"
                        "%s); "
                        "max concurrency %d requests of %d tokens", self.kv_cache_dtype, num_blocks, self.block_size,
                        capacity, num_blocks * kv_bytes_per_block(local, self.block_size, self.dtype,
                                                                  self.kv_cache_dtype) / 2**30,
                        f" per rank of {tp.world}" if tp.world > 1 else "", self.max_num_seqs,
                        self.max_num_seqs * state_bytes_per_slot(local, self.dtype, state_dtype) / 2**30,
                        f"; {self.prefix_cache_slots} more for the prefix cache" if self.prefix_cache_slots else "",
                        min(self.max_num_seqs, capacity // max_len or 1), max_len)
        return runner

    def kv_too_small(self, num_blocks: int, device: torch.device) -> str:
        """Why the explicit max_model_len does not fit a KV cache of num_blocks, naming the setting that sized it:
        num_kv_blocks when given, or on the CPU (a fixed budget); on a GPU gpu_memory_utilization (num_kv_blocks skips
        the memory profile: a pool past what the card holds can run out of memory mid-request)."""
        capacity = num_blocks * self.block_size
        fix = "raise num_kv_blocks"
        if self.num_kv_blocks is None and device.type == "cuda":
            fix = f"raise gpu_memory_utilization (now {self.gpu_memory_utilization})"
        return (f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {self.block_size}) but max_model_len "
                f"is {self.max_model_len}; lower max_model_len to at most {capacity} or {fix}")


class EngineDeadError(RuntimeError):
    """The LLM cannot run any step again (its tensor-parallel group failed or was shut down)."""


class LLM:
    """Load a Qwen3.5 checkpoint directory and generate from it.

    device: "cuda", "cpu" or "auto" (cuda when available). dtype: "auto" (the checkpoint's dtype on CUDA, with
    float32 checkpoints run in bfloat16; float32 on CPU), "float32", "bfloat16" or "float16".
    tensor_parallel_size: N > 1 shards the model over N ranks of this node: this process is rank 0 (scheduling,
    sampling) and N - 1 worker processes are spawned (gloo on CPU; nccl on CUDA with device = rank). They stop on
    `shutdown()`, when the LLM is garbage-collected, or at interpreter exit.
    enable_expert_parallel: under tensor_parallel_size=N > 1 on an MoE model, each rank holds num_experts / N whole
    experts instead of 1/N of every expert's columns (router replicated, shared expert still TP-sharded); each rank
    computes only the pairs routed to its experts and the MoE's one all-reduce sums them. Ignored (with a log line)
    for dense models and for tensor_parallel_size=1. Experts may be 16-bit, int4 or FP8.
    kv_cache_dtype: "auto" (the KV cache in the model dtype), "int8", "int4" or "fp8" (e4m3): keys and values
    quantized per token and kv head on write, with fp32 scales (and zeros for int8 / int4) beside the blocks; the
    cache takes ~1/2 (int8, fp8) or ~1/4 (int4) of the bf16 bytes, so auto-sizing fits ~2x / ~4x the tokens.
    state_dtype: "auto" (the checkpoint's mamba_ssm_dtype: float32 in the released configs), "float32" or
    "bfloat16": the dtype the GDN recurrent states are held in between steps (every update runs in fp32 and rounds
    once on store). bfloat16 halves the state traffic of a decode step (2 MiB -> 1 MiB per layer per sequence at
    9B shapes) at a measured accuracy cost (README, "GDN state in bfloat16").
    async_scheduling: read each step's samples while the next step runs, so host work overlaps the device (README,
    "Async scheduling"). None (default): on for CUDA with tensor_parallel_size=1, off otherwise. Outputs are the same
    either way; a request that stops costs one extra step of device work for its row.
    generation_config: "auto" (default): a call without sampling_params, and a server request that leaves a field
    out, sample with the checkpoint's generation_config.json settings (temperature, top_p, top_k, min_p,
    repetition_penalty; max_new_tokens as max_tokens), as vLLM does (do_sample false: greedy, as HF does; vLLM
    ignores it); "none" (or vLLM's spelling "vllm"): with SamplingParams' own defaults. Either way the file's
    eos_token_id ids end a request, as in vLLM, whose "vllm" drops only the sampling defaults.
    vLLM's trust_remote_code, tokenizer_mode ("auto", "hf", "slow": the one tokenizer), swap_space (preemption
    recomputes), disable_log_stats (no periodic stats log), quantization (when it names the checkpoint's own
    format), enable_chunked_prefill (True: always) and pipeline_parallel_size (1) are accepted (README).
    enable_prefix_caching: reuse the KV blocks and GDN states of earlier prompts' prefixes (runtime/prefix_cache.py):
    a prompt that starts with a cached prefix is prefilled from there. The GDN states are snapshots at multiples of
    256 tokens, each in one of `prefix_cache_slots` extra state slots (default 16; each the size of one request's
    states, taken from the KV cache's memory). Off by default.
    llm_engine: the engine, with the methods of vLLM's LLMEngine that scripts call (get_tokenizer, model_config /
    get_model_config, add_request / step / has_unfinished_requests, abort_request; deltaserve/llm_engine.py)."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", tokenizer: str | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 block_size: int = 16, num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 seed: int | None = 0, enforce_eager: bool = False, tensor_parallel_size: int = 1,
                 kv_cache_dtype: str = "auto", state_dtype: str = "auto", enable_expert_parallel: bool = False,
                 async_scheduling: bool | None = None, generation_config: str = "auto",
                 trust_remote_code: bool = False, enable_prefix_caching: bool | None = None,
                 prefix_cache_slots: int | None = None, tokenizer_mode: str = "auto", swap_space: float = 0,
                 disable_log_stats: bool = True, quantization: str | None = None,
                 enable_chunked_prefill: bool | None = None, pipeline_parallel_size: int = 1):
        # vLLM's trust_remote_code: nothing here runs a checkpoint's own code, so it changes nothing
        _check_vllm_only_args(tokenizer_mode, swap_space, disable_log_stats, enable_chunked_prefill,
                              pipeline_parallel_size)
        if not isinstance(model, (str, os.PathLike)):
            raise ValueError(f"model must be the path of a checkpoint directory, got {model!r}")
        model = os.path.expanduser(os.fspath(model))  # "~/models/x": the shell leaves a quoted ~ to us
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = os.path.expanduser(os.fspath(tokenizer))
        tok_dir = tokenizer or model
        if tokenizer is not None and not _has_tokenizer(tokenizer):
            raise TokenizerError(f"tokenizer {tokenizer!r} is not a directory holding tokenizer.json"
                                 f"{hub_id_hint(tokenizer)}.")
        config = ModelConfig.from_hf_dir(model)
        if has_own_lm_head(config, model):  # transformers' rule: such a checkpoint is not tied
            logger.warning("%s: config.json ties the word embeddings, but the checkpoint holds its own lm_head.weight "
                           "(different from the embedding); using it, as transformers does", model)
            config = dataclasses.replace(config, tie_word_embeddings=False)
        _check_quantization_arg(quantization, config)
        self._setup(config, model, Tokenizer.from_dir(tok_dir) if _has_tokenizer(tok_dir)
                    else None, device, dtype, max_num_seqs, max_num_batched_tokens, max_model_len, block_size,
                    num_kv_blocks, gpu_memory_utilization, seed, enforce_eager, tensor_parallel_size, kv_cache_dtype,
                    state_dtype=state_dtype, enable_expert_parallel=enable_expert_parallel,
                    async_scheduling=async_scheduling, generation_config=generation_config,
                    prefix_cache_slots=_prefix_cache_slots(enable_prefix_caching, prefix_cache_slots))
        self._dirs = (model, tok_dir if self.tokenizer is not None else None)

    @classmethod
    def from_config(cls, config: ModelConfig, device: str = "auto", dtype: str = "auto", max_num_seqs: int = 64,
                    max_num_batched_tokens: int = 2048, max_model_len: int | None = None, block_size: int = 16,
                    num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9, seed: int | None = 0,
                    enforce_eager: bool = False, tensor_parallel_size: int = 1, kv_cache_dtype: str = "auto",
                    quantization: str | None = None, group_size: int = 128, state_dtype: str = "auto",
                    enable_expert_parallel: bool = False, async_scheduling: bool | None = None,
                    enable_prefix_caching: bool | None = None, prefix_cache_slots: int | None = None) -> "LLM":
        """An engine over random weights of `config`'s shapes, made directly on the device (benchmarks: no
        checkpoint, no tokenizer; prompts are token ids). Under TP each rank draws its own shard: the same shapes
        and speed as a real checkpoint, not the same numbers as the TP=1 model of this seed.
        quantization: None (16-bit), "awq": int4 AWQ (group_size input channels per scale) in the mixed pattern
        of Qwen3.5 AWQ checkpoints (models/formats.AWQ_MIXED_16BIT), the rest 16-bit, or "awq-full": every
        projection int4 but in_proj_a/b, the router and shared_expert_gate (what `deltaserve quantize` writes)."""
        formats = None
        if quantization is not None:
            config = _random_quant_config(config, quantization, group_size)
            formats = awq_formats(config, config.quantization.modules_to_not_convert)
        llm = cls.__new__(cls)
        llm._setup(config, None, None, device, dtype, max_num_seqs, max_num_batched_tokens, max_model_len,
                   block_size, num_kv_blocks, gpu_memory_utilization, seed, enforce_eager, tensor_parallel_size,
                   kv_cache_dtype, formats, state_dtype=state_dtype, enable_expert_parallel=enable_expert_parallel,
                   async_scheduling=async_scheduling,
                   prefix_cache_slots=_prefix_cache_slots(enable_prefix_caching, prefix_cache_slots))
        llm._dirs = (None, None)
        return llm

    def _setup(self, config: ModelConfig, weights_dir: str | None, tokenizer: Tokenizer | None, device: str,
               dtype: str, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int | None,
               block_size: int, num_kv_blocks: int | None, gpu_memory_utilization: float, seed: int | None,
               enforce_eager: bool, tensor_parallel_size: int, kv_cache_dtype: str = "auto",
               formats: dict[str, str] | None = None, state_dtype: str = "auto",
               enable_expert_parallel: bool = False, async_scheduling: bool | None = None,
               generation_config: str = "auto", prefix_cache_slots: int = 0) -> None:
        self.sampling_defaults = _checked_sampling_defaults(config, generation_config)
        config = dataclasses.replace(config, state_dtype=_resolve_state_dtype(state_dtype, config),
                                     expert_parallel=_expert_parallel(config, enable_expert_parallel,
                                                                      tensor_parallel_size))
        self.config, self.tokenizer, self._workers = config, tokenizer, None
        # get_tokenizer()'s: transformers' names and defaults over the same tokenizer (the engine keeps its own)
        self._hf_tokenizer = None if tokenizer is None else HFTokenizer(tokenizer)
        # request id -> the queue of the open generate_stream that owns it: whoever steps the engine (another stream,
        # generate, abort) hands that request's outputs there, so open streams never see or lose each other's
        self._inbox: dict[str, deque[RequestOutput]] = {}
        self.kv_cache_dtype = kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.config, self.device)
        check_kv_cache_device(kv_cache_dtype, self.device)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be an integer or None (a different random state each run), an integer in "
                             f"[0, 2**63); got {seed!r}")
        for name, flag in (("enforce_eager", enforce_eager), ("enable_expert_parallel", enable_expert_parallel),
                           ("async_scheduling", async_scheduling)):
            if not isinstance(flag, bool) and flag is not None:  # "no" would have counted as True
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        seed = torch.seed() if seed is None else seed  # drawn once: tensor-parallel ranks share it
        torch.manual_seed(seed)
        _check_positive(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        block_size=block_size, max_model_len=1 if max_model_len is None else max_model_len,
                        num_kv_blocks=1 if num_kv_blocks is None else num_kv_blocks)
        if max_model_len == 1:  # every prompt would fill it: a one-token prompt, answered by one token, and no more
            raise ValueError("max_model_len 1 holds only a one-token prompt, answered by one token whatever max_tokens "
                             "asks; use at least 2")
        if block_size > (limit := max_model_len or config.max_position_embeddings):
            can_raise = max_model_len is not None and max_model_len < config.max_position_embeddings
            raise ValueError(f"block_size {block_size} is more tokens than a sequence may hold ({limit}); use a "
                             f"block_size of at most {limit}" + (" or raise max_model_len" if can_raise else ""))
        if max_model_len is not None and max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len {max_model_len} is beyond the model's max_position_embeddings "
                             f"{config.max_position_embeddings} (the longest context it was trained for); lower it")
        if weights_dir is not None:
            formats = read_formats(config, weights_dir)  # headers only: quantized Linears constrain the TP cuts
        check_tp_size(config, tensor_parallel_size, self.device,
                      functools.partial(tp_problems, config, formats or {}))  # before any process starts
        if config.expert_parallel:
            logger.info("expert parallel: each of %d ranks holds %d of the %d experts whole", tensor_parallel_size,
                        config.num_experts // tensor_parallel_size, config.num_experts)
        if not 0 < gpu_memory_utilization <= 1:  # on the CPU too: a value no GPU could take is a typo
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        async_scheduling = _async_scheduling(async_scheduling, self.device, tensor_parallel_size)  # before any spawn
        spec = RankSpec(config, weights_dir, formats, self.device, self.dtype, max_num_seqs, max_num_batched_tokens,
                        max_model_len, block_size, num_kv_blocks, gpu_memory_utilization, seed, enforce_eager,
                        kv_cache_dtype, prefix_cache_slots)
        if tensor_parallel_size == 1:
            self.runner = _out_of_memory_as_value_error(lambda: spec.build_runner(SINGLE, self.device))
        else:
            if weights_dir is not None:
                checkpoint_files(weights_dir)  # a missing checkpoint fails here, not in N processes
            self.runner = self._start_tp(spec, tensor_parallel_size)
        self.model, self.max_model_len = self.runner.model, self.runner.max_model_len
        blocks = BlockPool(self.runner.num_kv_blocks, block_size)
        cache = prefix_cache.PrefixCache(blocks, list(range(max_num_seqs, max_num_seqs + prefix_cache_slots)),
                                         prefix_cache.CHUNK_TOKENS) if prefix_cache_slots else None
        scheduler = Scheduler(blocks, StatePool(max_num_seqs), max_num_seqs, max_num_batched_tokens, cache)
        eos = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.runner.eos_token_ids = tuple(sorted(eos))  # min_tokens holds back every id that would end a request
        self.engine = EngineCore(scheduler, self.runner, self.tokenizer, eos, self.max_model_len,
                                 self.config.vocab_size, async_scheduling)
        if self.sampling_defaults:
            logger.info("sampling defaults from generation_config.json: %s (generation_config='none' ignores them)",
                        ", ".join(f"{k}={v}" for k, v in self.sampling_defaults.items()))
        if self.device.type == "cuda":
            t = time.perf_counter()
            self.engine.warm_up()
            self.reset_prefix_cache()  # the warm-up's throwaway prompts
            logger.info("warm-up steps (kernel compilation for mixed batches) took %.1f s", time.perf_counter() - t)

    def _start_tp(self, spec: RankSpec, world: int) -> ModelRunner:
        """Spawn ranks 1..world-1, join the group as rank 0 and build rank 0's shard alongside them."""
        workers = TPWorkers(world, spec)
        self._workers = workers
        self._finalizer = weakref.finalize(self, workers.close)
        try:
            workers.wait_for("started")
            tp = workers.rendezvous(lambda: init_group(0, world, workers.port, spec.device))
            self.device = rank_device(spec.device, 0)
            runner = spec.build_runner(tp, self.device, on_loaded=lambda: workers.wait_for("loaded"))
            workers.wait_for("ready")
        except BaseException:
            workers.close(timeout=2.0)
            raise
        runner.peers = workers
        workers.before_leave = runner.release_graphs
        workers.watch()
        return runner

    def reset_prefix_cache(self) -> None:
        """Drop every cached prefix (vLLM's name); later prompts are prefilled in full until they are cached again."""
        if self.engine.scheduler.cache is not None:
            self.engine.scheduler.cache.clear()

    @property
    def llm_engine(self) -> LLMEngine:
        """The engine with vLLM's LLMEngine methods (a view made on each access: holding this LLM from an attribute
        would be a reference cycle, and the LLM's tensor-parallel workers stop when it is garbage-collected)."""
        return LLMEngine(self, *self._dirs)

    def get_tokenizer(self) -> HFTokenizer | None:
        """The tokenizer (vLLM's accessor), answering as transformers' tokenizer does (its defaults: decode keeps
        special tokens, apply_chat_template returns ids; see HFTokenizer); None for a model without tokenizer.json.
        `llm.tokenizer` is deltaserve's own, with deltaserve's defaults."""
        return self._hf_tokenizer

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes now (idempotent; a no-op without TP). The LLM is unusable after."""
        if self._workers is not None:
            self._finalizer()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the tensor-parallel workers (ranks 1..N-1); empty without TP."""
        return self._workers.pids if self._workers is not None else []

    @property
    def tp_lost(self) -> bool:
        """Whether a tensor-parallel worker exited outside shutdown (the watchdog saw it; safe from any thread, unlike
        tp_failure, which reads the workers' pipes)."""
        return self._workers is not None and self._workers.lost.is_set()

    def tp_failure(self, wait: float = 0.0) -> str | None:
        """Why this LLM's tensor-parallel group can no longer run (a worker exited, or shutdown), else None."""
        return self._workers.failure(wait) if self._workers is not None else None

    def _check_usable(self, wait: float = 0.0) -> None:
        if (why := self.tp_failure(wait)) is not None:
            raise EngineDeadError(f"this LLM cannot run any more: {why}; create a new one")

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None, priority: list[int] | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or a list of {"prompt_token_ids": [...]} -> outputs in input order.
        vLLM's lora_request and priority are taken at their defaults only (None; priority zeros)."""
        self._check_usable()
        _check_vllm_request_args(lora_request, priority)
        items = _normalise_prompts(prompts)
        params = _normalise_params(sampling_params, len(items), self.get_default_sampling_params())
        return self._run(self._add_all(items, params), use_tqdm)

    def generate_stream(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                        ) -> Iterator[RequestOutput]:
        """Like generate, but yields a RequestOutput every step a request makes progress; each completion carries
        `delta_text` / `delta_token_ids` (new since its previous yield). The requests are checked and queued here (a
        bad prompt or parameter raises at this call, with nothing queued) and run as the stream is iterated, or as
        any other call steps the engine. Closing the stream early, or dropping it, aborts the requests still
        running, freeing their KV blocks and state slots."""
        self._check_usable()
        items = _normalise_prompts(prompts)
        params = _normalise_params(sampling_params, len(items), self.get_default_sampling_params())
        ids = self._add_all(items, params)
        box: deque[RequestOutput] = deque()
        self._inbox.update((rid, box) for rid in ids)
        return _RequestStream(self, ids, box)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request (queued or running) now; its KV blocks and state slot are freed immediately. A request of
        an open generate_stream also ends there, with this output (finish_reason "abort")."""
        out = self.engine.abort(request_id)
        if out is not None:
            self._deliver([out])
        return out

    def _step(self, finished_only: bool = False) -> list[RequestOutput]:
        """engine.step; if it raises, every request was aborted (EngineCore.step): the open streams get their
        requests' abort outputs, then the error goes on to this caller."""
        try:
            return self.engine.step(finished_only)
        except Exception:  # a worker that died surfaces as gloo's / a pipe's error: say what happened instead
            self._check_usable(wait=1.0)
            raise
        finally:
            eng = self.engine
            failed, eng.read_before_failure, eng.failed_outputs = eng.read_before_failure + eng.failed_outputs, [], []
            self._deliver(failed)

    def _deliver(self, outs: list[RequestOutput]) -> list[RequestOutput]:
        """Queue each output whose request an open stream owns; -> the others."""
        rest = []
        for out in outs:
            box = self._inbox.get(out.request_id)
            if box is not None:
                box.append(out)
            else:
                rest.append(out)
        return rest

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without sampling_params samples with: SamplingParams' defaults, with the checkpoint's
        generation_config.json settings on top (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens
        as max_tokens; do_sample false: greedy) unless the LLM was made with generation_config="none"."""
        return SamplingParams(**self.sampling_defaults)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template_kwargs: dict | None = None, tools: list | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template: str | None = None, lora_request=None, chat_template_content_format: str = "auto",
             mm_processor_kwargs: dict | None = None) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of conversations. A content may
        be a list of OpenAI text parts ({"type": "text", "text": ...}, or plain strings); chat_template_content_format
        says how they reach the template, as vLLM's: "string" joined with "\n", "openai" as a list of text parts,
        "auto" by what the template reads. A non-text part (an image, audio, video) is refused: the model is
        text-only, and so vLLM's mm_processor_kwargs is taken as None only."""
        _check_vllm_request_args(lora_request, None, mm_processor_kwargs)
        if self.tokenizer is None:
            raise ValueError("LLM.chat needs a tokenizer with a chat template; none was found in the model directory")
        msgs = list(messages) if isinstance(messages, Iterable) and not isinstance(messages, (str, dict)) else None
        convs = [msgs] if msgs and isinstance(msgs[0], dict) else msgs
        if convs is None or not all(isinstance(c, (list, tuple)) for c in convs):
            raise ValueError(f"messages must be a conversation (a list of {{'role', 'content'}} dicts) or a list of "
                             f"conversations, got {messages!r:.80}")
        if not convs:
            raise ValueError("LLM.chat needs at least one conversation (a list of {'role', 'content'} messages)")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise ValueError(f"chat_template_kwargs must be a dict of template variables, got "
                             f"{type(chat_template_kwargs).__name__}")
        extra = dict(chat_template_kwargs or {})
        reserved = sorted(set(extra) & {"conversation", "messages", "tokenize"})
        if reserved:
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(reserved)}: pass the conversation as "
                             f"messages; LLM.chat renders text")
        if "tools" in extra:  # vLLM lets the kwargs give the tools
            if tools is not None:
                raise ValueError("give tools either as LLM.chat's tools or in chat_template_kwargs, not both")
            tools = extra.pop("tools")
        kwargs = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                  "chat_template": chat_template, "chat_template_content_format": chat_template_content_format,
                  **extra}  # theirs win
        prompts = [self.tokenizer.apply_chat_template(c, tools=tools, tokenize=False, **kwargs) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _add_all(self, items: list, params: list[SamplingParams]) -> list[str]:
        """Queue every prompt, or none: if one is rejected, the ones already queued are aborted."""
        ids: list[str] = []
        try:
            for p, sp in zip(items, params):
                text = p if isinstance(p, str) else p.get("prompt")
                ids.append(self.engine.add_request(self._encode(p), sp, prompt=text))
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return ids

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (no tokenizer.json beside its weights, or built with "
                                 "LLM.from_config): pass {'prompt_token_ids': [...]}, or a tokenizer directory "
                                 "(LLM(tokenizer=DIR), --tokenizer DIR)")
            return self.tokenizer.encode(prompt)
        return list(prompt["prompt_token_ids"])

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            # vLLM's use_tqdm may be the bar's factory (e.g. partial(tqdm, disable=rank != 0))
            bar = (use_tqdm if callable(use_tqdm) else tqdm)(total=len(ids), desc="Generating", unit="req")
            tokens_in = tokens_out = 0
        try:
            # until the engine is idle (an in-flight step read too); with a stream open, until these are done (the
            # stream steps its own requests on), and every output is built, since the stream's requests need theirs
            while self.engine.has_unfinished() and (len(done) < len(ids) or not self._inbox):
                for out in self._deliver(self._step(finished_only=not self._inbox)):
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        if bar is not None:
                            tokens_in += len(out.prompt_token_ids or ())
                            tokens_out += sum(len(c.token_ids) for c in out.outputs)
                            _speed_postfix(bar, tokens_in, tokens_out)
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[rid] for rid in ids]


def _speed_postfix(bar, tokens_in: int, tokens_out: int) -> None:
    """vLLM's progress-bar postfix: prompt and output tokens a second so far (a tqdm bar; a factory's bar without
    tqdm's postfix is left as it is)."""
    if hasattr(bar, "set_postfix_str") and hasattr(bar, "format_dict"):
        elapsed = max(bar.format_dict.get("elapsed", 0.0), 1e-9)
        bar.set_postfix_str(f"est. speed input: {tokens_in / elapsed:.2f} toks/s, output: {tokens_out / elapsed:.2f} "
                            f"toks/s", refresh=False)


def _auto_kv_blocks(model: torch.nn.Module, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                    block_size: int, max_num_seqs: int, max_num_batched_tokens: int, util: float,
                    state_dtype: torch.dtype, max_model_len: int, kv_cache_dtype: str = "auto",
                    prefix_cache_slots: int = 0) -> int:
    """KV blocks that fit this rank (cfg: its shard_config): on CUDA, util x card memory minus weights, the profiled
    peak of a full step and the state slots (one per sequence, and the prefix cache's); on CPU, a fixed budget. Never
    more than max_num_seqs full-length sequences need."""
    per_block = max(1, kv_bytes_per_block(cfg, block_size, dtype, kv_cache_dtype))
    full = max_num_seqs * math.ceil(max_model_len / block_size)
    if device.type != "cuda":
        return max(1, min(full, CPU_KV_BUDGET_BYTES // per_block))
    activations = profile_activation_bytes(model, cfg, device, dtype, state_dtype, max_num_batched_tokens, block_size,
                                           kv_cache_dtype)
    _, total = torch.cuda.mem_get_info(device)
    states = (max_num_seqs + prefix_cache_slots) * state_bytes_per_slot(cfg, dtype, state_dtype)
    budget = util * total - torch.cuda.memory_allocated(device) - activations - states
    blocks = min(full, int(budget // per_block))
    if blocks < 1:
        raise ValueError(f"no GPU memory left for the KV cache at gpu_memory_utilization={util} (weights "
                         f"{torch.cuda.memory_allocated(device) / 2**30:.1f} GiB, step peak "
                         f"{activations / 2**30:.1f} GiB); raise it or lower max_num_batched_tokens/max_num_seqs")
    return blocks


def _check_vllm_only_args(tokenizer_mode: str, swap_space: float, disable_log_stats: bool,
                          enable_chunked_prefill: bool | None, pipeline_parallel_size: int) -> None:
    """vLLM arguments that mean nothing different here: one tokenizer (tokenizers' byte-level BPE, whose ids HF's
    fast and slow Qwen tokenizers share), preemption recomputes instead of swapping, no periodic stats log, prefills
    always chunked (the budget is max_num_batched_tokens), one pipeline stage."""
    if enable_chunked_prefill is False:
        raise ValueError("enable_chunked_prefill=False: deltaserve always splits prompts into chunks of at most "
                         "max_num_batched_tokens (raise that to prefill long prompts in one step)")
    if pipeline_parallel_size != 1:
        raise ValueError(f"pipeline_parallel_size={pipeline_parallel_size!r}: deltaserve shards models with "
                         f"tensor_parallel_size only")
    if tokenizer_mode not in ("auto", "hf", "slow"):
        raise ValueError(f"tokenizer_mode={tokenizer_mode!r}: deltaserve runs the checkpoint's tokenizer.json only "
                         f"('auto', 'hf' and 'slow' all mean it)")
    if isinstance(swap_space, bool) or not isinstance(swap_space, (int, float)) or swap_space < 0:
        raise ValueError(f"swap_space must be a number of GiB >= 0 (unused here: a preempted request is recomputed, "
                         f"not swapped), got {swap_space!r}")
    if not isinstance(disable_log_stats, bool):
        raise ValueError(f"disable_log_stats must be True or False, got {disable_log_stats!r}")


def _check_vllm_request_args(lora_request, priority: list[int] | None, mm_processor_kwargs: dict | None = None) -> None:
    """vLLM's per-call lora_request, priority and mm_processor_kwargs: their defaults mean what deltaserve does;
    anything else is refused."""
    if lora_request is not None:
        raise ValueError(f"lora_request={lora_request!r}: deltaserve runs no LoRA adapters (merge the adapter into the "
                         f"checkpoint's weights, or leave lora_request out)")
    if priority is not None and (not isinstance(priority, (list, tuple)) or any(p != 0 for p in priority)):
        raise ValueError(f"priority={priority!r}: deltaserve schedules requests first come, first served (leave "
                         f"priority out, or pass zeros)")
    if mm_processor_kwargs is not None:
        raise ValueError(f"mm_processor_kwargs={mm_processor_kwargs!r:.80}: the model is text-only, with no "
                         f"multimodal processor to pass them to (leave mm_processor_kwargs out)")


# vLLM's `quantization` names -> the quantization_config method of the checkpoints that hold them
_QUANTIZATION_NAMES = {"awq": "awq", "awq_marlin": "awq", "compressed-tensors": "compressed-tensors", "fp8": "fp8"}


def _check_quantization_arg(quantization: str | None, config: ModelConfig) -> None:
    """vLLM's `quantization`: here the format is the checkpoint's own, so a name is accepted when it says what the
    checkpoint holds, and refused when it asks for a conversion at load time."""
    if quantization is None:
        return
    held = config.quantization.method if config.quantization is not None else None
    if quantization not in _QUANTIZATION_NAMES:
        raise ValueError(f"quantization={quantization!r}: deltaserve reads {', '.join(sorted(_QUANTIZATION_NAMES))} "
                         f"checkpoints (and takes the format from the checkpoint: leave quantization out)")
    if _QUANTIZATION_NAMES[quantization] != held:
        what = f"holds {held!r} weights" if held else "holds 16-bit weights"
        # `deltaserve quantize` writes awq and fp8 copies of a 16-bit checkpoint, nothing else
        method = _QUANTIZATION_NAMES[quantization] if _QUANTIZATION_NAMES[quantization] in ("awq", "fp8") else None
        how = (f", or write a copy in that format with `deltaserve quantize SRC DST --method {method}`"
               if held is None and method else "")
        raise ValueError(f"quantization={quantization!r}, but the checkpoint {what}: deltaserve runs a checkpoint in "
                         f"the format it was saved in (leave quantization out{how})")


def _prefix_cache_slots(enabled: bool | None, slots: int | None) -> int:
    """State slots for the prefix cache: 0 when it is off."""
    if not isinstance(enabled, bool) and enabled is not None:  # "false" would have turned the cache on
        raise ValueError(f"enable_prefix_caching must be True or False, got {enabled!r}")
    if not enabled:
        if slots is not None:
            raise ValueError("prefix_cache_slots sizes the prefix cache: pass enable_prefix_caching=True with it")
        return 0
    if slots is None:
        return DEFAULT_PREFIX_CACHE_SLOTS
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise ValueError(f"prefix_cache_slots must be a positive integer, got {slots!r}")
    return slots


# the optional keys of vLLM's TextPrompt / TokensPrompt, which vLLM reads as absent when None (what deltaserve can do
# with them: nothing, so a value there is refused)
_VLLM_PROMPT_OPTIONS = frozenset({"multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids", "cache_salt",
                                  "token_type_ids"})


def _normalise_prompts(prompts) -> list:
    """-> a list of strings and {'prompt_token_ids': [...]} dicts (with the ids' text as 'prompt' if given); vLLM's
    text prompt {'prompt': str} becomes its string."""
    if prompts is None:
        raise ValueError("prompts is None: pass a string, a list of strings, or {'prompt_token_ids': [...]} dicts")
    try:
        items = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    except TypeError:
        items = [prompts]  # not iterable: refused below as a prompt of the wrong type
    out = []
    for p in items:
        if isinstance(p, dict):
            p = {k: v for k, v in p.items() if v is not None or k not in _VLLM_PROMPT_OPTIONS}  # None: absent
            if "input_ids" in p and not {"prompt", "prompt_token_ids"} & set(p):
                raise ValueError("this prompt is a tokenizer's output ({'input_ids', ...}, e.g. get_tokenizer()."
                                 "apply_chat_template's default): pass {'prompt_token_ids': enc['input_ids']}")
            if extra := sorted(map(str, set(p) - {"prompt", "prompt_token_ids"})):
                raise ValueError(f"a prompt dict takes 'prompt' (a string) or 'prompt_token_ids' (a list of ids); "
                                 f"{', '.join(map(repr, extra))} is not supported")
            if "prompt" not in p and "prompt_token_ids" not in p:
                raise ValueError("a prompt dict takes one of 'prompt' (a string) or 'prompt_token_ids' (a list of ids)")
            ids = p.get("prompt_token_ids")
            if isinstance(ids, tuple) or getattr(ids, "ndim", None) == 1:  # a tuple, a 1-D numpy / torch array
                p = {**p, "prompt_token_ids": ids.tolist() if hasattr(ids, "tolist") else list(ids)}
            # with both, vLLM's TokensPrompt: the ids run, the text is reported as the prompt
            p = p["prompt"] if "prompt_token_ids" not in p and isinstance(p["prompt"], str) else p
        if not isinstance(p, str) and not (isinstance(p, dict) and isinstance(p.get("prompt_token_ids"), list)
                                           and isinstance(p.get("prompt", ""), str)):
            raise ValueError("each prompt must be a string, {'prompt': str} or {'prompt_token_ids': [...]}")
        out.append(p if isinstance(p, str) else {**p, "prompt_token_ids": _integer_ids(p["prompt_token_ids"])})
    return out


def _integer_ids(ids: list) -> list:
    """A token prompt's ids, each an int (numpy integers and 0-d integer tensors read as theirs); a float or other
    non-integer is refused as such, as vLLM does (1.0 was reported "outside the vocabulary")."""
    if all(type(t) is int for t in ids):  # the usual case, without a call per id
        return ids
    plain = [_plain(t) for t in ids]
    for t, v in zip(ids, plain):
        if not _is_int(v):
            raise ValueError(f"prompt token ids must be integers, got {t!r} ({type(t).__name__})")
    return plain


def _normalise_params(sp, n: int, default: SamplingParams) -> list[SamplingParams]:
    if sp is None:
        return [default] * n
    if isinstance(sp, SamplingParams):
        return [sp] * n
    sp = list(sp) if isinstance(sp, Iterable) and not isinstance(sp, (dict, str)) else None  # a generator: once
    if sp is None or not all(isinstance(p, SamplingParams) for p in sp):
        raise ValueError("sampling_params must be a SamplingParams or a list of them (not a dict: "
                         "SamplingParams(**options))")
    if len(sp) != n:
        raise ValueError(f"got {len(sp)} SamplingParams for {n} prompts; pass one, or one per prompt")
    return sp


def _checked_sampling_defaults(config: ModelConfig, generation_config: str) -> dict:
    """The sampling settings a request that does not set them gets: "auto" the checkpoint's generation_config.json
    ones (config.sampling_defaults), "none" / "vllm" SamplingParams' own. The file's EOS ids stop requests under
    all three (config.eos_token_ids): vLLM's "vllm" reads it for them too (ModelConfig.try_get_generation_config)."""
    if generation_config not in ("auto", "none", "vllm"):
        raise ValueError(f"generation_config must be 'auto', 'none' or 'vllm' (the same as 'none'), got "
                         f"{generation_config!r}; another folder's generation_config.json is not supported")
    defaults = dict(config.sampling_defaults) if generation_config == "auto" else {}
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ConfigError(f"generation_config.json's sampling settings cannot be used ({e}); fix the file or pass "
                          f"generation_config='none'.") from None
    return defaults


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available; use device='cpu'")
    return torch.device(device)


def _random_quant_config(config: ModelConfig, quantization: str, group_size: int) -> ModelConfig:
    """config with the quantization_config of a random-weight int4 model (from_config)."""
    if quantization not in RANDOM_AWQ_PATTERNS:
        raise ValueError(f"quantization={quantization!r} is not supported for random weights; use 'awq' (int4, "
                         f"mixed like Qwen3.5 AWQ checkpoints), 'awq-full' (int4 as deltaserve quantize writes) "
                         f"or None (16-bit)")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive number of input channels (e.g. 128), got {group_size!r}")
    return dataclasses.replace(config, quantization=QuantConfig("awq", 4, group_size, True,
                                                                  RANDOM_AWQ_PATTERNS[quantization]))


_DTYPE_ALIASES = {"half": "float16", "float": "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                  torch.float32: "float32"}  # vLLM's other spellings


def _resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    dtype = _DTYPE_ALIASES.get(dtype, dtype)
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if cfg.torch_dtype == "float32" else DTYPES[cfg.torch_dtype]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    if device.type == "cuda" and dtype == "float32":
        # the head_dim-256 attention and GDN tiles are sized for 16-bit operands: fp32 ones overflow shared memory
        raise ValueError("dtype='float32' is not supported on CUDA (the Triton kernels run bfloat16 or float16); "
                         "use dtype='bfloat16', or device='cpu' for a float32 reference")
    return DTYPES[dtype]


def _expert_parallel(config: ModelConfig, enable: bool, tensor_parallel_size: int) -> bool:
    """Whether the experts are split whole over the TP ranks: asked for, on an MoE model, over more than one rank."""
    if not enable:
        return False
    if not config.is_moe:
        logger.info("enable_expert_parallel ignored: %s is a dense model (no experts)", config.architecture)
        return False
    if tensor_parallel_size == 1:
        logger.info("enable_expert_parallel ignored: tensor_parallel_size=1, the one rank holds every expert")
        return False
    return True


def _async_scheduling(requested: bool | None, device: torch.device, tensor_parallel_size: int) -> bool:
    """Only rank 0 samples under tensor parallelism, so the other ranks could not feed a token still in flight."""
    if requested and tensor_parallel_size > 1:
        raise ValueError("async_scheduling needs tensor_parallel_size=1 (under tensor parallelism only rank 0 holds "
                         "the sampled tokens); drop it or --tp")
    return device.type == "cuda" and tensor_parallel_size == 1 if requested is None else requested


def _resolve_state_dtype(state_dtype: str, cfg: ModelConfig) -> str:
    """"auto" -> the checkpoint's mamba_ssm_dtype; float16 is refused (its range is too small for a decaying sum)."""
    name = cfg.state_dtype if state_dtype == "auto" else state_dtype
    if name not in ("float32", "bfloat16"):
        source = "the checkpoint's mamba_ssm_dtype" if state_dtype == "auto" else "state_dtype"
        raise ValueError(f"{source} is {name!r}, but the GDN recurrent state runs in 'float32' or 'bfloat16'; "
                         f"pass state_dtype='float32' (--state-dtype float32)")
    return name


def _out_of_memory_as_value_error(build):
    """build(), with running out of memory (the weights, or caches sized by num_kv_blocks / max_num_seqs /
    max_num_batched_tokens / block_size) as one sentence instead of an allocator's stack trace."""
    try:
        return build()
    except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one; on CPU "DefaultCPUAllocator: can't allocate"
        first = (str(e).splitlines() or [""])[0]
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in first:
            raise
        asked = re.search(r"allocate (\d+) bytes", first)
        detail = f"an allocation of {int(asked[1]) / 2**30:.1f} GiB failed" if asked else first[:160]
        raise ValueError(f"the model and its caches do not fit in memory ({detail}): lower num_kv_blocks, "
                         f"max_num_seqs, max_num_batched_tokens or gpu_memory_utilization, or use a smaller or "
                         f"quantized model") from None


def _check_positive(**kwargs) -> None:
    for name, v in kwargs.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _has_tokenizer(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "tokenizer.json"))


class _RequestStream:
    """generate_stream's iterator: yields its requests' outputs from its inbox (whoever stepped the engine put them
    there), stepping the engine itself while one is unfinished; close() (or garbage collection) aborts the rest."""

    def __init__(self, llm: LLM, ids: list[str], box: deque[RequestOutput]):
        self._llm, self._ids, self._box = llm, ids, box
        self._pending = set(ids)
        self._closed = False

    def __iter__(self) -> _RequestStream:
        return self

    def __next__(self) -> RequestOutput:
        llm = self._llm
        while not self._box:
            # done; or ended where no output reached this stream (engine.abort called directly)
            if self._closed or not self._pending or not any(rid in llm.engine.groups for rid in self._pending):
                self.close()
                raise StopIteration
            try:
                llm._deliver(llm._step())
            except BaseException:
                self.close()
                raise
        out = self._box.popleft()
        if out.finished:
            self._pending.discard(out.request_id)
        return out

    def close(self) -> None:
        """Stop: the requests still running are aborted (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for rid in self._ids:
            self._llm._inbox.pop(rid, None)
        for rid in self._pending:
            self._llm.engine.abort(rid)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the engine may already be gone
            pass
