"""`deltaserve` command line: make-tiny and generate (serve, chat, bench and quantize come with their issues).

Any error a user can cause (bad path, bad checkpoint, bad flag value) prints one line `error: ...` and exits 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

DEFAULT_TINY_DIR = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "deltaserve",
                                "tiny-qwen3.5")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help=f"Hugging Face Qwen3.5 checkpoint directory (default: the embedded tiny checkpoint, "
                        f"created on first use in {DEFAULT_TINY_DIR})")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight/activation dtype (auto: checkpoint dtype on CUDA, float32 on CPU)")
    g.add_argument("--max-model-len", type=int, default=None, help="max prompt + output tokens per request")
    g.add_argument("--max-num-seqs", type=int, default=64, help="max requests running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per engine step")
    g.add_argument("--block-size", type=int, default=16, help="tokens per paged-KV block")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="explicit KV pool size (overrides auto sizing)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of GPU memory to use")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    g.add_argument("--n", type=int, default=1, help="completions per prompt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve", description="Inference engine for Qwen3.5 models.")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="write a tiny random Qwen3.5 checkpoint (HF layout)",
                          description="Write a tiny random Qwen3.5 checkpoint in the Hugging Face layout "
                                      "(config, safetensors, trained byte-level BPE tokenizer, chat template).")
    tiny.add_argument("dir", help="output directory")
    tiny.add_argument("--moe", action="store_true", help="Qwen3_5MoeForConditionalGeneration instead of dense")
    tiny.add_argument("--layers", type=int, default=4, help="decoder layers (every 4th is full attention)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed")
    gen = sub.add_parser("generate", help="complete a prompt and print the text",
                         description="Complete one or more prompts and print each completion.")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    add_engine_args(gen)
    add_sampling_args(gen)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .config import ConfigError
    from .models.weights import WeightsError
    from .tokenizer import TokenizerError

    try:
        if args.command == "make-tiny":
            from .tiny import make_tiny

            print(make_tiny(args.dir, moe=args.moe, num_layers=args.layers, seed=args.seed))
        elif args.command == "generate":
            _generate(args)
        return 0
    except (ConfigError, WeightsError, TokenizerError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


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
                num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization)


def _generate(args) -> None:
    from . import LLM, SamplingParams

    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, max_tokens=args.max_tokens, stop=args.stop, seed=args.seed,
                            ignore_eos=args.ignore_eos, repetition_penalty=args.repetition_penalty,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)
    llm = LLM(**engine_kwargs(args))
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
