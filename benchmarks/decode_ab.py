"""Two variants of the engine in one process, decode ms a step: A as the tree is, B with module globals set.

    python benchmarks/decode_ab.py --preset qwen3.5-35b-a3b --layers 8 --quantization awq --batch-sizes 1,2 \\
        --set deltaserve.kernels.fused_moe.decode:MAX_TOKENS=0
    python benchmarks/decode_ab.py --preset qwen3.5-35b-a3b --layers 8 --quantization awq --drop router

--drop BLOCK takes one block out of every layer for B (DROPS: its output is its input, fixed routes or zeros, so no
kernel runs for it): A - B is what that block costs inside the step, with the launches and PDL overlaps around it,
which a kernel's own time on a timeline does not show. B's model computes nonsense; only its time means anything.

Each variant is built --builds times (random weights of a bench preset); every round times each build in turn
(A, B, A, B, ...; `bench_decode`: every sequence at --context tokens). B's settings are in place while its LLMs are
built (weight layouts, CUDA graphs captured) and while they are timed, and put back after, so a switch read at either
point takes effect. Set a global in the module that reads it: a name taken with `from module import NAME` is that
module's own copy (decode_kpack.MAX_TOKENS is read as fused_moe.decode's MAX_TOKENS, as above). Prints every build's
figures per round, then the median per batch size of each variant and B / A. (The int4 layouts with prefill times
and several dequantization thresholds: int4_layout_ab.py.)

Why builds in one process: one tree (35B-A3B shapes cut to 8 layers, AWQ, batch 1, context 1024, H200, 2026-12-02)
gave 0.648-0.697 ms a step in four separate processes; two variants that turned out equal at batch 1, two builds each
over three rounds in one process (this scheme), gave all twelve figures within 0.639-0.644 ms. For a change that is
code, not a setting, add a module global that selects it (as `int4_gemm.USE_MMA` does), or patch the function in a
copy of this script."""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import statistics
from typing import Callable, Iterator

import torch


def parse_setting(text: str) -> tuple[object, str, object]:
    """'package.module:NAME=literal' -> (module, NAME, value); the module must already have NAME."""
    target, sep, literal = text.partition("=")
    path, colon, name = target.partition(":")
    if not sep or not colon or not name:
        raise ValueError(f"--set {text!r}: expected MODULE:NAME=VALUE, e.g. deltaserve.kernels.int4_gemm:USE_MMA=False")
    try:
        module = importlib.import_module(path)
    except ImportError:
        raise ValueError(f"--set {text!r}: no module {path}") from None
    if not hasattr(module, name):
        raise ValueError(f"--set {text!r}: {path} has no {name}")
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError):
        raise ValueError(f"--set {text!r}: {literal!r} is not a Python literal (quote strings)") from None
    return module, name, value


@contextlib.contextmanager
def applied(settings: list[tuple[object, str, object]]) -> Iterator[None]:
    """The settings in place for the block, the values before them put back after."""
    before = [(module, name, getattr(module, name)) for module, name, _ in settings]
    try:
        for module, name, value in settings:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in reversed(before):
            setattr(module, name, value)


def _identity(self, x: torch.Tensor) -> torch.Tensor:
    return x


def _no_gated_norm(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return x


class _ZeroMix:
    """GatedDeltaNet.mix's stand-in: zeros of its output's shape, sliced (no launch) from one tensor made on the first
    call, which the graph runner's warm-up makes outside the capture. Zeros, not an uninitialised tensor: garbage
    (maybe NaN) reaching the router could send every pair to one expert (it clamps a NaN row's picks) and change what
    the rest of the step costs."""
    ROWS = 8192

    def __init__(self):
        self.zeros: dict[tuple, torch.Tensor] = {}

    def __call__(self, gdn, proj, batch, conv_state, recurrent_state) -> torch.Tensor:
        x = proj[0]
        key = (gdn.hv, gdn.dv, x.dtype, x.device)
        if key not in self.zeros or self.zeros[key].shape[0] < x.shape[0]:
            self.zeros[key] = x.new_zeros(max(x.shape[0], self.ROWS), gdn.hv, gdn.dv)
        return self.zeros[key][:x.shape[0]]


class _FixedRoutes:
    """SparseMoE._route's stand-in: every token's k (+1 shared) experts fixed, from tensors made before any build,
    so a captured graph reads them without a launch. Tokens past ROWS (long prefills) are routed for real."""
    ROWS = 8192

    def __init__(self, experts: int, top_k: int, device: str, real):
        self.real = real  # SparseMoE._route itself
        t = torch.arange(self.ROWS)[:, None]
        routed = (t * top_k + torch.arange(top_k)[None, :]) % experts  # k distinct experts a token, spread out
        self.ids = torch.cat([routed, torch.full((self.ROWS, 1), experts)], 1).to(device)
        self.weights = torch.full((self.ROWS, top_k + 1), 1.0 / (top_k + 1), device=device)

    def __call__(self, moe, x: torch.Tensor, gate_weight: torch.Tensor | None = None):
        t, width = x.shape[0], moe.top_k + (gate_weight is not None)
        if t > self.ROWS:
            return self.real(moe, x, gate_weight)
        return self.weights[:t, :width], self.ids[:t, :width]


def drop_settings(name: str, experts: int = 0, top_k: int = 0, device: str = "cpu") -> list[tuple[object, str,
                                                                                                   object]]:
    """--drop NAME -> settings for `applied` (the class attributes that take the block out). experts / top_k: the
    model's router (for "router")."""
    from deltaserve.layers.gated_deltanet import GatedDeltaNet
    from deltaserve.layers.mlp import GatedMLP
    from deltaserve.layers.moe import SparseMoE
    from deltaserve.layers.norm import GatedRMSNorm

    if name == "router":
        if not experts:
            raise ValueError("--drop router: this model has no MoE router")
        fixed = _FixedRoutes(experts, top_k, device, SparseMoE._route)
        return [(SparseMoE, "_route", lambda moe, x, gate_weight=None: fixed(moe, x, gate_weight))]
    zero_mix = _ZeroMix()
    drops = {"mlp": [(SparseMoE, "forward", _identity), (GatedMLP, "forward", _identity)],
             "gdn": [(GatedDeltaNet, "mix", lambda gdn, *args: zero_mix(gdn, *args))],
             "gated-norm": [(GatedRMSNorm, "forward", _no_gated_norm)]}
    if name not in drops:
        raise ValueError(f"--drop {name!r}: choose one of {', '.join(DROPS)}")
    return drops[name]


DROPS = ("mlp", "router", "gdn", "gated-norm")  # the MLP or MoE block; the MoE's routing launch; the GDN layers'
# conv + delta-rule decode; the GDN output norm. (Not the decoder norms: without them the step measured slower, 0.660
# -> 0.709 ms on an H200; the hidden states, and with them what the other kernels do, change too much to read A - B as
# the norms' cost.)


def run_ab(build: Callable[[], object], settings: list[tuple[object, str, object]], batches: list[int], context: int,
           steps: int, builds: int = 2, rounds: int = 3, out: Callable[[str], None] = print
           ) -> dict[str, list[float]]:
    """build() -> an LLM. -> {"A": [...], "B": [...]}: the median over builds and rounds of the seconds a decode step
    takes, per batch size."""
    from deltaserve.bench import bench_decode

    engines = []
    for i in range(2 * builds):
        variant = "AB"[i % 2]
        with applied(settings if variant == "B" else []):
            engines.append((variant, i // 2, build()))
    times: dict[str, list[list[float]]] = {"A": [[] for _ in batches], "B": [[] for _ in batches]}
    for rnd in range(rounds):
        for variant, copy, llm in engines:
            with applied(settings if variant == "B" else []):
                row = [bench_decode(llm, b, context, steps) for b in batches]
            for col, t in zip(times[variant], row):
                col.append(t)
            out(f"{variant} build {copy} round {rnd}: " + ", ".join(f"batch {b} {t * 1e3:.3f}" for b, t in
                                                                      zip(batches, row)) + " ms")
    medians = {v: [statistics.median(col) for col in cols] for v, cols in times.items()}
    for i, b in enumerate(batches):
        a, bb = medians["A"][i], medians["B"][i]
        out(f"batch {b}: A {a * 1e3:.3f} ms, B {bb * 1e3:.3f} ms, B / A {bb / a:.3f}")
    return medians


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3.5-35b-a3b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--quantization", default=None, help="awq, awq-full, fp8 (as `deltaserve bench`); default 16-bit")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--builds", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV blocks a build holds (default: enough for the largest batch; every build stays resident)")
    p.add_argument("--set", action="append", default=[], metavar="MODULE:NAME=VALUE", help="B's settings")
    p.add_argument("--drop", choices=DROPS, help="B: this block taken out of every layer (module docstring)")
    args = p.parse_args()
    from deltaserve import LLM
    from deltaserve.bench import preset_config

    cfg = preset_config(args.preset, args.layers)
    try:
        settings = [parse_setting(s) for s in args.set]
        if args.drop:
            settings += drop_settings(args.drop, cfg.num_experts if cfg.is_moe else 0, cfg.num_experts_per_tok
                                      if cfg.is_moe else 0, "cuda" if torch.cuda.is_available() else "cpu")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    batches = [int(b) for b in args.batch_sizes.split(",")]
    max_len = args.context + 3 * args.steps + 64
    block = 16  # tokens a KV block
    blocks = args.num_kv_blocks or max(batches) * -(-max_len // block) + 16

    def build():
        return LLM.from_config(cfg, max_num_seqs=max(batches),
                               max_model_len=max_len, block_size=block, num_kv_blocks=blocks,
                               quantization=args.quantization)

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    changes = args.set + ([f"without {args.drop}"] if args.drop else [])
    print(f"{args.preset} {args.layers} layers {args.quantization or '16-bit'}, context {args.context}, B: "
          f"{', '.join(changes) or '(the same as A)'}; {card}")
    run_ab(build, settings, batches, args.context, args.steps, args.builds, args.rounds)


if __name__ == "__main__":
    main()
