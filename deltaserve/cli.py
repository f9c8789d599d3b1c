"""`deltaserve` command line: make-tiny, generate, serve (OpenAI-compatible server), chat (terminal chat), bench
and quantize (write an AWQ int4 or block-FP8 checkpoint).

Any error a user can cause (bad path, bad checkpoint, bad flag value) prints one line `error: ...` and exits 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

DEFAULT_TINY_DIR = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "deltaserve",
                                "tiny-qwen3.5")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into one `error:` line naming the flag)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: a comma-separated list of integers >= 1."""
    return [positive_int(part) for part in text.split(",")]


def add_engine_args(p: argparse.ArgumentParser, prefix_cache: bool = True) -> None:
    """prefix_cache False: its two flags stay parseable (to be refused in a sentence) but leave --help."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help=f"Hugging Face Qwen3.5 checkpoint directory (default: the embedded tiny checkpoint, "
                        f"created on first use in {DEFAULT_TINY_DIR})")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight/activation dtype (auto: checkpoint dtype on CUDA, float32 on CPU)")
    g.add_argument("--max-model-len", type=positive_int, default=None, help="max prompt + output tokens per request")
    g.add_argument("--max-num-seqs", type=positive_int, default=64, help="max requests running at once")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=2048, help="token budget per engine step")
    g.add_argument("--block-size", type=positive_int, default=16, help="tokens per paged-KV block")
    g.add_argument("--num-kv-blocks", type=positive_int, default=None,
                   help="explicit KV pool size (overrides auto sizing)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "int4", "fp8"],
                   help="KV cache storage: auto = the model dtype; int8 / int4 / fp8 quantize keys and values per "
                        "token and kv head (about 2x / 4x / 2x the tokens in the same memory)")
    g.add_argument("--state-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="GDN recurrent-state storage: auto = the checkpoint's mamba_ssm_dtype (float32); bfloat16 "
                        "halves the state traffic of a decode step at a small accuracy cost (see the README)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of GPU memory to use")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: neither for decode steps nor for the pieces of short prefills")
    g.add_argument("--async-scheduling", default=None, action=argparse.BooleanOptionalAction,
                   help="read each step's samples while the next step runs, overlapping host and device work "
                        "(default: on for CUDA with --tp 1)")
    g.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                   help="tensor-parallel ranks on this node: one process per rank (gloo on CPU, nccl on CUDA GPUs "
                        "0..N-1); default 1")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tp N on an MoE model: each rank holds num_experts/N whole experts instead of 1/N of "
                        "every expert (ignored for dense models and --tp 1)")
    g.add_argument("--enable-prefix-caching", action="store_true",
                   help="reuse the KV blocks and GDN states of earlier prompts' prefixes (snapshots every 256 tokens; "
                        "see the README)" if prefix_cache else argparse.SUPPRESS)
    g.add_argument("--prefix-cache-slots", type=positive_int, default=None,
                   help="GDN state snapshots the prefix cache holds (default 16; each one request's states)"
                        if prefix_cache else argparse.SUPPRESS)


def add_chat_template_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_JINJA",
                   help="a Jinja chat template (a file, or the template itself) to render chats with instead of the "
                        "model's")


def add_generation_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generation-config", choices=["auto", "none", "vllm"], default="auto",
                   help="auto (default): sampling settings a request leaves out come from the checkpoint's "
                        "generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty); none (or "
                        "vLLM's vllm): ignore them. Its eos_token_id ids end a request either way, as in vLLM")


# what the CLI samples with when neither a flag nor generation_config.json says (greedy, unlike SamplingParams)
_CLI_SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (unset: generation_config.json's value, else greedy)")
    p.set_defaults(fallback_max_tokens=64)  # chat raises it
    g.add_argument("--max-tokens", type=int, default=None,
                   help="tokens to generate (default: generation_config.json's max_new_tokens, else 64; else 1024 in "
                        "the chat command)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None, help="0 = off")
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--min-tokens", type=int, default=0, help="no EOS / stop before this many tokens")
    g.add_argument("--json-schema", default=None, metavar="FILE_OR_JSON",
                   help="structured output: the answer is an instance of this JSON schema (a file, or inline JSON)")
    g.add_argument("--regex", default=None, help="structured output: the answer matches this regex")
    g.add_argument("--choice", action="append", default=None, help="structured output: the answer is one of these "
                                                                   "(repeatable)")


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line (argparse printed the whole usage block first: 25 lines for `--max-tokens abc`)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deltaserve", description="Inference engine for Qwen3.5 models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    tiny = sub.add_parser("make-tiny", help="write a tiny random Qwen3.5 checkpoint (HF layout)",
                          description="Write a tiny random Qwen3.5 checkpoint in the Hugging Face layout "
                                      "(config, safetensors, trained byte-level BPE tokenizer, chat template).")
    tiny.add_argument("dir", help="output directory")
    tiny.add_argument("--moe", action="store_true", help="Qwen3_5MoeForConditionalGeneration instead of dense")
    tiny.add_argument("--layers", type=int, default=4, help="decoder layers (every 4th is full attention)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed")
    tiny.add_argument("--force", action="store_true", help="write into a directory that is not empty (its config, "
                                                          "weights, tokenizer and chat-template files are replaced, "
                                                          "an earlier checkpoint's shards removed)")
    gen = sub.add_parser("generate", help="complete a prompt and print the text",
                         description="Complete one or more prompts and print each completion.")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    add_engine_args(gen)
    add_generation_config_arg(gen)
    add_chat_template_arg(gen)
    add_sampling_args(gen)
    _add_serve_parser(sub)
    _add_chat_parser(sub)
    _add_bench_parser(sub)
    _add_quantize_parser(sub)
    parser.commands = sub.choices  # name -> its parser (main: errors from the top parser that belong to one)
    return parser


def _add_quantize_parser(sub) -> None:
    q = sub.add_parser("quantize", help="write an AWQ int4 (AutoAWQ gemm layout) or block-FP8 checkpoint",
                       description="Quantize a 16-bit Qwen3.5 checkpoint to AWQ int4 (AutoAWQ 'gemm' layout, "
                                   "round-to-nearest with zero points) or, with --method fp8, to block-wise FP8 "
                                   "(e4m3 weights with a weight_scale_inv per 128 x 128 block, the layout of the "
                                   "official Qwen FP8 releases). The decoder layers' projections and experts are "
                                   "quantized; in_proj_a/b, the MoE router, shared_expert_gate, norms, embeddings, "
                                   "lm_head, conv1d, A_log and dt_bias stay 16-bit (listed in "
                                   "modules_to_not_convert).")
    q.add_argument("src", help="16-bit checkpoint directory")
    q.add_argument("dst", help="output directory")
    q.add_argument("--method", default="awq", choices=["awq", "fp8"], help="quantization format (default awq)")
    q.add_argument("--group-size", type=int, default=128, help="AWQ: input channels per scale (default 128)")
    q.add_argument("--not-convert", action="append", default=None, metavar="SUBSTR",
                   help="also keep modules whose name contains SUBSTR in 16-bit (repeatable), e.g. "
                        "'layers.0.' or 'self_attn.' (keeping only some of q/k/v, gate/up or in_proj_qkv/z "
                        "16-bit is warned about: vLLM fuses each group into one Linear)")
    q.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text: search activation-aware per-channel scales on its activations (AWQ) "
                        "instead of plain round-to-nearest; loads the model on the CPU in float32")


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint directory (same as --model; default: the embedded tiny checkpoint)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")


def _add_serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                         description="Serve a model over an OpenAI-compatible HTTP API: /v1/chat/completions, "
                                     "/v1/completions, /v1/models, /tokenize, /detokenize, /health, /version, "
                                     "/metrics.")
    _add_model_arg(srv)
    g = srv.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes, /tokenize and "
                                                   "/detokenize (/health, /version and /metrics stay open)")
    g.add_argument("--served-model-name", default=None,
                   help="model name clients send (default: MODEL as given, or 'tiny-qwen3.5')")
    g.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds running requests get to finish after SIGTERM before they are aborted (default 5)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    g.add_argument("--log-stats-interval", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between the stats lines logged while requests run (throughputs, running / waiting "
                        "requests, KV cache usage, prefix cache hit rate; default 10, 0: none)")
    g.add_argument("--disable-log-stats", action="store_true", help="no stats lines (vLLM's flag; as interval 0)")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="let a request's chat_template field replace the chat template (Jinja from clients, run in "
                        "a sandbox; refused by default, as in vLLM)")
    g.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help="leave a request's tools out of the prompt under tool_choice 'none' (by default the model "
                        "sees them and any call it writes stays content, as in vLLM)")
    add_engine_args(srv)
    add_generation_config_arg(srv)
    add_chat_template_arg(srv)


def _add_bench_parser(sub) -> None:
    from .bench import PRESETS

    b = sub.add_parser("bench", help="prefill and decode speed, each next to its measured bound",
                       description="Time prefill (per prompt length) and decode (per batch size) of the whole engine "
                                   "and print each figure as a fraction of its bound: FLOPs over the measured bf16 "
                                   "GEMM rate for prefill, bytes touched (weights + KV + GDN state) over the "
                                   "measured copy bandwidth for decode.")
    b.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="random weights of a published shape, made on the device (no checkpoint needed)")
    b.add_argument("--layers", type=positive_int, default=None, help="cut the preset to N layers")
    b.add_argument("--quantization", default=None,
                   help="'awq': the preset in int4 AWQ, mixed like Qwen3.5 AWQ checkpoints (o_proj, "
                        "out_proj, MLPs and experts int4; q/k/v, GDN in-projections, router, shared_expert_gate "
                        "16-bit); 'awq-full': int4 as `deltaserve quantize` writes (all projections but "
                        "in_proj_a/b, router and shared_expert_gate); default: all 16-bit")
    b.add_argument("--group-size", type=positive_int, default=None,
                   help="with --quantization: AWQ input channels per scale (default 128)")
    b.add_argument("--prompt-lens", type=positive_ints, default=[512, 2048, 8192],
                   help="comma-separated prefill lengths (default 512,2048,8192)")
    b.add_argument("--batch-sizes", type=positive_ints, default=[1, 16, 64],
                   help="comma-separated decode batch sizes (default 1,16,64)")
    b.add_argument("--prefill-count", type=positive_int, default=1, help="prompts per prefill measurement (e.g. 16)")
    b.add_argument("--context", type=positive_int, default=1024, help="tokens of context per decoding sequence")
    b.add_argument("--steps", type=positive_int, default=32, help="decode steps timed per batch size")
    add_engine_args(b, prefix_cache=False)  # bench refuses the prefix cache (_check_bench)
    b.set_defaults(max_num_batched_tokens=8192, max_num_seqs=None)  # max_num_seqs: the largest batch unless given


def _add_chat_parser(sub) -> None:
    chat = sub.add_parser("chat", help="interactive chat in the terminal",
                          description="Chat with a model in the terminal: streamed answers, multi-turn history, "
                                      "/reset, /exit; a message of several lines between two \"\"\" lines, or "
                                      "with a \\ ending each line but the last. Reasoning is shown dimmed unless "
                                      "--hide-thinking.")
    _add_model_arg(chat)
    g = chat.add_argument_group("chat")
    g.add_argument("--system", default=None, help="system prompt")
    g.add_argument("--hide-thinking", action="store_true", help="do not show the model's reasoning")
    g.add_argument("--no-thinking", action="store_true",
                   help="ask the model not to reason (chat template enable_thinking=False)")
    add_engine_args(chat)
    add_generation_config_arg(chat)
    add_chat_template_arg(chat)
    add_sampling_args(chat)
    chat.set_defaults(fallback_max_tokens=1024)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    # Ctrl-C anywhere (while torch imports, while the model loads; serve: uvicorn re-raises it after its graceful
    # shutdown): no traceback
    except KeyboardInterrupt:
        if sys.stderr.isatty():  # the prompt after "^C" starts on a line of its own
            sys.stderr.write("\n")
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()  # imports torch (bench's presets), so it runs under main's Ctrl-C handler
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse reports these from the top parser, whose --help does not list the subcommand's flags
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .config import ConfigError
    from .llm import EngineDeadError
    from .models.weights import WeightsError
    from .tokenizer import TokenizerError

    try:
        if args.command == "make-tiny":
            from .tiny import make_tiny

            args.dir = os.path.expanduser(args.dir)
            if os.path.exists(args.dir) and not os.path.isdir(args.dir):
                raise ValueError(f"{args.dir} is a file; make-tiny writes a checkpoint directory, give it a directory")
            if not args.force and os.path.isdir(args.dir) and os.listdir(args.dir):
                raise ValueError(f"{args.dir} is not an empty directory: make-tiny would replace its config.json, "
                                 f"weights and tokenizer; pick a new directory or pass --force")
            print(make_tiny(args.dir, moe=args.moe, num_layers=args.layers, seed=args.seed))
        elif args.command == "generate":
            _generate(args)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "chat":
            return _chat(args)
        elif args.command == "bench":
            _bench(args)
        elif args.command == "quantize":
            from .quantize import quantize_checkpoint

            print(quantize_checkpoint(args.src, args.dst, method=args.method, group_size=args.group_size,
                                      not_convert=args.not_convert, calib=args.calib))
        return 0
    except (ConfigError, WeightsError, TokenizerError, ValueError, OSError) as e:  # OSError: e.g. a path is a file
        if isinstance(e, OSError) and e.filename and e.strerror:  # not "[Errno 2] No such file or directory: 'x'"
            e = f"cannot use {e.filename}: {e.strerror}"
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EngineDeadError as e:  # e.g. a tensor-parallel worker died
        print(f"error: {e}", file=sys.stderr)
        return 1


def resolve_model(path: str | None) -> str:
    if path is not None:
        return path
    if not os.path.isfile(os.path.join(DEFAULT_TINY_DIR, "model.safetensors")):
        from .tiny import make_tiny

        make_tiny(DEFAULT_TINY_DIR)
    return DEFAULT_TINY_DIR


def engine_kwargs(args) -> dict:
    return dict(model=resolve_model(args.model), device=args.device, dtype=args.dtype,
                max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
                enforce_eager=args.enforce_eager, tensor_parallel_size=args.tp, kv_cache_dtype=args.kv_cache_dtype,
                state_dtype=args.state_dtype, enable_expert_parallel=args.enable_expert_parallel,
                async_scheduling=args.async_scheduling, generation_config=args.generation_config,
                enable_prefix_caching=args.enable_prefix_caching, prefix_cache_slots=args.prefix_cache_slots)


def _merge_model_arg(args) -> None:
    """MODEL (positional) and --model name the same thing."""
    if args.model_pos is not None:
        if args.model is not None and args.model != args.model_pos:
            raise ValueError(f"MODEL ({args.model_pos}) and --model ({args.model}) differ; give one of them")
        args.model = args.model_pos


def _sampling_params(args, defaults: dict | None = None):
    """The flags -> SamplingParams; a setting no flag gives comes from defaults (the model's generation_config.json,
    LLM.sampling_defaults), else _CLI_SAMPLING."""
    from . import SamplingParams

    given = {k: getattr(args, k) for k in _CLI_SAMPLING if getattr(args, k) is not None}
    defaults = dict(defaults or {})
    max_tokens = defaults.pop("max_tokens", args.fallback_max_tokens)  # generation_config's max_new_tokens, else ours
    return SamplingParams(n=args.n, **{**_CLI_SAMPLING, **defaults, **given},
                          max_tokens=max_tokens if args.max_tokens is None else args.max_tokens, stop=args.stop,
                          seed=args.seed,
                          ignore_eos=args.ignore_eos, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, min_tokens=args.min_tokens,
                          structured_outputs=_structured_outputs(args))


def _structured_outputs(args):
    """--json-schema / --regex / --choice (at most one) -> StructuredOutputs or None."""
    from .sampling_params import StructuredOutputs

    given = [(kind, value) for kind, value in (("json", args.json_schema), ("regex", args.regex),
                                                ("choice", args.choice)) if value is not None]
    if len(given) > 1:
        raise ValueError("give at most one of --json-schema, --regex and --choice")
    if not given:
        return None
    kind, value = given[0]
    if kind == "json":
        text, path = value, os.path.expanduser(value)
        if os.path.isfile(path):
            text = _flag_file_text("--json-schema", path)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema is neither a file nor valid JSON ({e.msg} at line {e.lineno})") from None
    return StructuredOutputs(**{kind: value})


def _build_llm(args):
    from . import LLM
    from .serve.testing import install_from_env

    template = _chat_template_text(args.chat_template) if args.chat_template is not None else None
    llm = LLM(**engine_kwargs(args), tokenizer=args.tokenizer)
    if template is not None:
        if llm.tokenizer is None:
            raise ValueError("--chat-template needs a model with a tokenizer (tokenizer.json)")
        llm.tokenizer.set_chat_template(template)
    install_from_env(llm)  # TEST-ONLY hook, inert unless DELTASERVE_TEST_FORCED_OUTPUTS is set
    return llm


def _chat_template_text(value: str) -> str:
    """--chat-template: the template itself when it holds Jinja's braces or a newline, else a file to read (as vLLM
    decides)."""
    if any(c in value for c in "{}\n"):
        return value
    value = os.path.expanduser(value)
    if not os.path.isfile(value):
        raise ValueError(f"--chat-template {value!r} looks like a file path, but there is no such file (a template "
                         f"given inline must contain Jinja's {{ }})")
    return _flag_file_text("--chat-template", value)


def _flag_file_text(flag: str, path: str) -> str:
    """The text of the file a flag names; ValueError naming the flag and file where it cannot be read or is not UTF-8
    (the bare OSError / UnicodeDecodeError named neither the flag nor, for the latter, the file)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{flag} file {path} cannot be read ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{flag} file {path} is not UTF-8 text; save it as UTF-8") from None


def _bench_len(args, budget: int) -> int:
    """Tokens a bench sequence can reach: the longest prompt, or a decode context plus the steps timed, the warm-up
    ones and those its row decodes while the rest of the batch is prefilled in chunks of `budget` tokens."""
    catch_up = -(-max(args.batch_sizes) * args.context // budget)
    return max(max(args.prompt_lens), args.context + args.steps + 16 + catch_up) + 8


def _check_bench(args, budget: int) -> None:
    """Flags bench would otherwise ignore, and sizes whose timed steps could not hold the whole batch."""
    if args.enable_prefix_caching or args.prefix_cache_slots is not None:
        raise ValueError("bench times prefill and decode without the prefix cache (its prompts repeat, so a cache "
                         "would time copies instead of prefill): drop --enable-prefix-caching / --prefix-cache-slots")
    if args.preset and args.model:
        raise ValueError(f"--preset {args.preset} builds random weights of that shape and --model {args.model} loads a "
                         f"checkpoint: give one of them")
    if not args.preset and (args.quantization or args.layers):
        flag = "--quantization" if args.quantization else "--layers"
        raise ValueError(f"{flag} applies to --preset (random weights); a checkpoint runs as it is stored, so drop "
                         f"{flag} with --model")
    if args.group_size and not args.quantization:
        raise ValueError("--group-size applies with --quantization awq / awq-full")
    need = max(*args.batch_sizes, args.prefill_count)
    if args.max_num_seqs is not None and args.max_num_seqs < need:
        raise ValueError(f"--max-num-seqs {args.max_num_seqs} is below the largest batch ({need}); bench runs each "
                         f"batch whole: raise it or drop it")
    longest = _bench_len(args, budget)
    if args.max_model_len is not None and args.max_model_len < longest:
        raise ValueError(f"--max-model-len {args.max_model_len} is below the {longest} tokens a run needs (the longest "
                         f"prompt, or --context + --steps + the decode steps of a chunked prefill); raise it or lower "
                         f"those")


def _check_bench_fits(path: str, longest: int) -> None:
    """A checkpoint too short for bench's sizes: named by the flags that set them (else the engine blamed a
    max_model_len the user never gave, e.g. the tiny model's 4096 against the default --prompt-lens' 8192)."""
    from .config import ModelConfig

    limit = ModelConfig.from_hf_dir(path).max_position_embeddings
    if longest > limit:
        raise ValueError(f"the model holds {limit} tokens (max_position_embeddings) and bench's sizes need {longest} "
                         f"(the longest of --prompt-lens, or --context + --steps + the decode steps of a chunked "
                         f"prefill); lower those, e.g. --prompt-lens 512,2048 --context 1024")


def _bench(args) -> None:
    from . import LLM
    from .bench import format_table, preset_config, run_bench

    budget = max(args.max_num_batched_tokens, max(args.prompt_lens) * args.prefill_count)
    _check_bench(args, budget)
    kw = dict(device=args.device, dtype=args.dtype,
              max_num_seqs=args.max_num_seqs or max(*args.batch_sizes, args.prefill_count),
              max_num_batched_tokens=budget, max_model_len=args.max_model_len or _bench_len(args, budget),
              block_size=args.block_size,
              num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype, state_dtype=args.state_dtype,
              enable_expert_parallel=args.enable_expert_parallel, async_scheduling=args.async_scheduling)
    if args.preset:
        group_size = args.group_size or 128
        llm = LLM.from_config(preset_config(args.preset, args.layers), tensor_parallel_size=args.tp,
                              quantization=args.quantization, group_size=group_size, **kw)
        name = args.preset if args.tp == 1 else f"{args.preset} TP={args.tp}"
        if llm.config.expert_parallel:
            name += " EP"
        if args.quantization:
            name += f" | awq int4 g{group_size} ({'full' if args.quantization == 'awq-full' else 'mixed'})"
    else:
        path = resolve_model(args.model)
        if args.max_model_len is None:
            _check_bench_fits(path, kw["max_model_len"])
        llm, name = LLM(model=path, tensor_parallel_size=args.tp, **kw), args.model or "tiny"
    rows = run_bench(llm, args.prompt_lens, args.batch_sizes, args.context, args.steps,
                     prefill_count=args.prefill_count)
    dev = torch_device_name(llm.device)
    print(format_table(rows, f"{name} | {dev} | {str(llm.dtype).replace('torch.', '')} | KV "
                             f"{llm.kv_cache_dtype} | GDN state {llm.config.state_dtype} | decode context "
                             f"{args.context} | CUDA graphs {'on' if llm.runner.graphs else 'off'} | async scheduling "
                             f"{'on' if llm.engine.async_scheduling else 'off'}"))


def torch_device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _serve(args) -> None:
    _merge_model_arg(args)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if not args.shutdown_timeout >= 0:  # nan too
        raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    if not args.log_stats_interval >= 0:  # nan too
        raise ValueError(f"--log-stats-interval must be >= 0 seconds (0: no stats lines), got "
                         f"{args.log_stats_interval}")
    if args.api_key is not None and not args.api_key.strip():  # --api-key "$UNSET": would admit 'Bearer ' alone
        raise ValueError("--api-key is empty; give the key clients must send, or leave the flag out to serve "
                         "without one")
    _check_listen(args.host, args.port)
    try:
        from .serve.api_server import run_server
    except ImportError as e:
        raise ValueError(f"deltaserve serve needs fastapi, uvicorn and prometheus-client ({e}); "
                         f"pip install deltaserve with its server dependencies") from None
    name = args.served_model_name or args.model or "tiny-qwen3.5"
    run_server(_build_llm(args), name, host=args.host, port=args.port, api_key=args.api_key,
               shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
               trust_request_chat_template=args.trust_request_chat_template,
               exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
               model_root=args.model or DEFAULT_TINY_DIR,  # /v1/models' root: the checkpoint, as vLLM's
               log_stats_interval=0.0 if args.disable_log_stats else args.log_stats_interval)


def _check_listen(host: str, port: int) -> None:
    """Fail before the model loads, in one line, where the server could not listen: uvicorn found out only after
    the model had loaded, logged the OSError and exited with status 3, after a 'serving ... on' line. An address of a
    family this machine lacks ("::1 localhost" with IPv6 off) or cannot use is skipped, as asyncio under uvicorn
    skips it."""
    import errno
    import socket

    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address this machine can listen on ({e.strerror})") from None
    for family, kind, proto, _, address in addresses:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL:
                    raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port or "
                                     "--host") from None


def _chat(args) -> int:
    from .serve.chat_cli import ChatSession, run

    _merge_model_arg(args)
    _check_sampling_flags(args)
    llm = _build_llm(args)
    if llm.tokenizer is not None:  # a template that does not compile: one line now, not an error at every message
        llm.tokenizer.check_chat_template()
    params = _sampling_params(args, llm.sampling_defaults)
    session = ChatSession(llm, params, system=args.system, enable_thinking=not args.no_thinking,
                          hide_thinking=args.hide_thinking)
    return run(session, f"deltaserve chat: {args.model or 'the embedded tiny checkpoint'}")


def _check_sampling_flags(args) -> None:
    """Bad sampling flags fail before the model loads. Without --max-tokens the bound comes from the checkpoint's
    generation_config.json, not read yet: none here (--min-tokens is checked against it once the model is loaded);
    without --temperature so does the temperature: a sampling one here (--n > 1 is checked once it is known)."""
    _sampling_params(args, {"max_tokens": None, "temperature": 1.0})


def _generate(args) -> None:
    if args.chat_template is not None and not args.chat:  # without --chat no template runs: say so, not ignore it
        raise ValueError("--chat-template renders chats: add --chat to wrap each prompt as a user message")
    _check_sampling_flags(args)
    llm = _build_llm(args)
    params = _sampling_params(args, llm.sampling_defaults)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, use_tqdm=False)
    else:
        outs = llm.generate(args.prompt, params, use_tqdm=False)
    for prompt, out in zip(args.prompt, outs):
        for c in out.outputs:
            print(f"--- prompt: {prompt!r} | {len(c.token_ids)} tokens, finish: {c.finish_reason}")
            print(c.text)


if __name__ == "__main__":
    sys.exit(main())
