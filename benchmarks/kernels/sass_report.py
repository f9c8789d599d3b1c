"""Compile our hot Triton kernels for a GPU architecture on any machine (no GPU needed) and report what ptxas made.

For each kernel, at the specializations the engine launches it with: registers per thread, stack bytes (> 0: spills
to local memory), shared memory, the SASS instruction count and its most frequent opcodes. Reading these costs no
device time and answers the first questions about a slow kernel: does it spill, did the loads become 16-byte or
cp.async (LDGSTS), are there quarter-rate converts (I2F, F2F), does ptxas re-materialize constants (IMAD.MOV.U32 in
the inner loop: it cost the K-packed int4 GEMV 17-22% until its masks became arguments). Uses the ptxas and cuobjdump
that the triton wheel ships, so the figures are for the installed Triton (the GPU machine's may differ).

    python benchmarks/kernels/sass_report.py                      # every kernel below, sm_90
    python benchmarks/kernels/sass_report.py --kernel kpack_gemv --dump /tmp/sass   # also write the SASS
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("sass_report compiles kernels: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


@dataclass
class Spec:
    fn_path: str  # module:function
    types: dict[str, str]  # argument -> Triton type of the non-constexpr arguments ("*bf16", "i32", "fp32", ...)
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    div16: set[str] = field(default_factory=set)  # int arguments the JIT sees divisible by 16 (strides, sizes)

    def function(self):
        module, name = self.fn_path.split(":")
        return getattr(__import__(module, fromlist=[name]), name)


def _decode_spec(kind: int) -> Spec:
    """The decode kernel the engine launches for KV_KIND `kind` under a bf16 q (int8: triton_int8.py's)."""
    code = {0: "*bf16", 1: "*i16", 2: "*u8", 3: "*u8"}[kind]  # as paged_attention_decode passes them
    from deltaserve.kernels.paged_attention.triton_decode import _DECODE_TILE_D256

    tile = _DECODE_TILE_D256[kind]  # the tile the engine launches at head_dim 256
    k, v = ("k_codes", "v_words") if kind == 1 else ("k_cache", "v_cache")
    types = {"q": "*bf16", k: "*i8" if kind == 1 else code, v: code, "k_scale": "*fp32", "v_scale": "*fp32", "k_zero": "*fp32",
             "v_zero": "*fp32", "gate": "*bf16", "o": "*bf16", "part_m": "*fp32", "part_l": "*fp32",
             "part_acc": "*fp32", "block_tables": "*i32", "context_lens": "*i32", "scale_log2": "fp32",
             "num_partitions": "i32", "spread": "i32", "part_lo": "i32", "part_hi": "i32", "part_round": "i32"}
    strides = ["stride_qn", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh",
               "stride_gn", "stride_gh", "stride_on", "stride_oh", "stride_bt"]
    types.update({s: "i32" for s in strides})
    consts = dict(H=16, G=4, BLOCK_H=16, BS=16, D=256, BLOCK_N=tile[0], SPLIT=True, HAS_GATE=True, USE_PDL=True)
    if kind == 1:
        fn, consts["USE_ASM"] = "triton_int8:decode_int8_partial_kernel", True
    else:
        fn, consts["KV_KIND"], consts["DOT_PRECISION"] = "triton_decode:_decode_partial_kernel", kind, "tf32"
    return Spec(f"deltaserve.kernels.paged_attention.{fn}", types, consts, tile[1], tile[2], set(strides))


def _gdn_decode_spec(block_v: int, arrive_late: bool) -> Spec:
    """The GDN decode kernel at 9B / 35B-A3B head shapes (Hk 16, HV 32, K = V = 128) with V-tiles of block_v."""
    return Spec("deltaserve.kernels.gated_delta_rule.triton_decode:_fused_recurrent_decode_kernel",
                dict(x="*bf16", conv_w="*bf16", conv_state="*bf16", a="*bf16", b="*bf16", A_log="*fp32",
                     dt_bias="*fp32", state="*fp32", slots="*i64", o="*bf16", counters="*i32", scale="fp32",
                     **{n: "i32" for n in ("s_x", "s_cs", "s_a", "s_b", "s_state")}),
                dict(HK=16, HV=32, K=128, V=128, W=4, BK=128, BV=block_v, BW=4, NV=128 // block_v,
                     ARRIVE_LATE=arrive_late, USE_PDL=True), 1, 3, {"s_x", "s_cs", "s_state"})


def _ints(*names: str) -> dict[str, str]:
    return {n: "i32" for n in names}


KERNELS: dict[str, Spec] = {
    "kpack_gemv": Spec(  # int4 decode GEMV, T = 1 (27B MLP plan: 512 columns, 4 warps)
        "deltaserve.kernels.int4_gemm.kpack:_kpack_gemv_kernel",
        dict(x="*bf16", qweight="*i32", qzeros="*i32", scales="*bf16", out="*fp32", expert_of_row="*bf16",
             **_ints("N", "K", "K_PER_SPLIT", "stride_xt", "stride_qk", "stride_zk", "stride_sk", "stride_os",
                     "stride_ot", "stride_qe", "stride_ze", "stride_se", "M_LO", "M_HI")),
        dict(GROUP=128, BN=512, X_ROW_DIV=1, INDEXED=False, PF_ROWS=0, USE_PDL=True), 4, 3,
        {"N", "K", "K_PER_SPLIT", "stride_qk", "stride_sk", "stride_os"}),
    "kpack_dot": Spec(  # int4 decode GEMV on the tensor cores, 2 <= T <= 16
        "deltaserve.kernels.int4_gemm.kpack:_kpack_dot_kernel",
        dict(x="*bf16", qweight="*i32", qzeros="*i32", scales="*bf16", out="*fp32",
             **_ints("T", "N", "K", "K_PER_SPLIT", "stride_xt", "stride_qk", "stride_zk", "stride_sk", "stride_os",
                     "stride_ot")),
        dict(GROUP=128, BN=256, MAGIC=128.0, USE_ASM=True, DOT_PRECISION="tf32", USE_PDL=True), 4, 3,
        {"N", "K", "K_PER_SPLIT", "stride_xt", "stride_qk", "stride_sk", "stride_os", "stride_ot"}),
    "int4_gemm": Spec(  # int4 prefill GEMM, K-packed, 128-row tiles
        "deltaserve.kernels.int4_gemm.triton:_int4_gemm_kernel",
        dict(x="*bf16", qweight="*i32", qzeros="*i32", scales="*bf16", out="*bf16",
             **_ints("T", "N", "K", "K_PER_SPLIT", "stride_xt", "stride_qk", "stride_zk", "stride_sk", "stride_os",
                     "stride_ot")),
        dict(GROUP=128, BM=128, BN=128, BK=64, DOT_PRECISION="tf32", KPACK=True), 8, 3,
        {"N", "K", "K_PER_SPLIT", "stride_xt", "stride_qk", "stride_zk", "stride_sk", "stride_os", "stride_ot"}),
    "logits": Spec(  # decode logits GEMV (fp32 out, LOGITS_TILE)
        "deltaserve.kernels.gemv.triton:_gemv_kernel",
        dict(x="*bf16", w="*bf16", out="*fp32", **_ints("M", "N", "K", "stride_xm", "stride_wn", "stride_om")),
        dict(BN=64, BK=256, DOT_PRECISION="tf32", USE_PDL=True), 4, 3,
        {"N", "K", "stride_xm", "stride_wn", "stride_om"}),
    "gemv": Spec(  # a 16-bit Linear's decode GEMV (bf16 out, linear_tile of the wide projections: N >= 8192)
        "deltaserve.kernels.gemv.triton:_gemv_kernel",
        dict(x="*bf16", w="*bf16", out="*bf16", **_ints("M", "N", "K", "stride_xm", "stride_wn", "stride_om")),
        dict(BN=32, BK=128, DOT_PRECISION="tf32", USE_PDL=True), 4, 4,
        {"N", "K", "stride_xm", "stride_wn", "stride_om"}),
    "moe_combine": Spec(  # MoE decode combine, T = 1 at 35B-A3B shapes (9 pairs, 4 splits, 64-column tiles, 2 warps)
        "deltaserve.kernels.fused_moe.decode:combine_kernel",
        dict(part="*fp32", weights="*fp32", ids="*i64", out="*bf16", S="i32", M="i32", H="i32"),
        dict(TOP_K=9, BLOCK_K=16, MUL_WEIGHT=True, BLOCK=64, BS=4, IDS_EARLY=True, USE_PDL=True), 2, 3, {"H"}),
    "route": Spec(  # MoE router, 256 experts top-8, the shared expert appended (35B-A3B shapes, H=2048)
        "deltaserve.kernels.fused_moe.route_triton:_route_kernel",
        dict(logits="*bf16", weights="*fp32", ids="*i64", x="*bf16", w_gate="*bf16", E="i32", H="i32",
             stride_lt="i32", stride_xt="i32"),
        dict(TOP_K=8, BLOCK_E=256, BLOCK_K=16, HAS_SHARED=True, BLOCK_H=1024), 1, 3,
        {"E", "H", "stride_lt", "stride_xt"}),
    "router": Spec(  # router GEMV + routing in one launch, T <= 16 (35B-A3B shapes: E=256, H=2048, 4 rows a program)
        "deltaserve.kernels.fused_moe.route_triton:_router_kernel",
        dict(x="*bf16", w_router="*bf16", w_gate="*bf16", scratch="*fp32", counter="*i32", weights="*fp32",
             ids="*i64", **_ints("E", "H", "stride_xt", "stride_we")),
        dict(TOP_K=8, BLOCK_N=4, BLOCK_H=1024, BLOCK_E=256, BLOCK_K=16, HAS_SHARED=True, USE_PDL=True), 4, 3,
        {"E", "H", "stride_xt", "stride_we"}),
    # GDN chunked prefill at Qwen3.5-9B shapes (HK=16, HV=32, K=V=128, bf16), the launch defaults of triton_chunk.py
    "gdn_diag": Spec(
        "deltaserve.kernels.gated_delta_rule.triton_chunk:_chunk_diag_kernel",
        dict(k="*bf16", a="*bf16", b="*bf16", A_log="*fp32", dt_bias="*fp32", chunk_table="*i32", g_cum="*fp32",
             beta="*fp32", kn="*bf16", T_diag="*fp32", **_ints("s_k", "s_a", "s_b")),
        dict(HK=16, HV=32, K=128, BC=16, BK=128, SUB=8, MERGE="tf32x3"), 1, 3, {"s_k", "s_a", "s_b"}),
    "gdn_solve": Spec(
        "deltaserve.kernels.gated_delta_rule.triton_chunk:_chunk_solve_kernel",
        dict(kn="*bf16", a="*bf16", b="*bf16", A_log="*fp32", dt_bias="*fp32", chunk_table="*i32", g_cum="*fp32",
             T_diag="*fp32", T_inv="*bf16", **_ints("s_a", "s_b")),
        dict(HK=16, HV=32, K=128, BT=64, BC=16, BK=128, MERGE="tf32x3"), 1, 3, {"s_a", "s_b"}),
    "gdn_scores": Spec(
        "deltaserve.kernels.gated_delta_rule.triton_chunk:_chunk_scores_kernel",
        dict(q="*bf16", kn="*bf16", g_cum="*fp32", chunk_table="*i32", qn="*bf16", A_qk="*bf16", s_q="i32",
             scale="fp32"),
        dict(HK=16, HV=32, K=128, BT=64, BK=128), 8, 3, {"s_q"}),
    "gdn_state": Spec(  # the state-and-output pass at 64-column V-tiles (many sequences)
        "deltaserve.kernels.gated_delta_rule.triton_chunk:_chunk_state_output_kernel",
        dict(qn="*bf16", kn="*bf16", v="*bf16", beta="*fp32", T_inv="*bf16", A_qk="*bf16", g_cum="*fp32",
             state="*fp32", slots="*i64", seq_table="*i32", o="*bf16", s_v="i32", s_state="i32"),
        dict(HK=16, HV=32, K=128, V=128, BT=64, BC=16, BK=128, BV=64), 4, 3, {"s_v", "s_state"}),
    "gdn_decode": _gdn_decode_spec(32, True),  # GDN decode, 32+ rows on an H200 (32-column state tiles, 1 warp)
    "gdn_decode_small": _gdn_decode_spec(16, False),  # below 32 rows (16-column tiles, 1 warp)
    "decode_bf16": _decode_spec(0),
    "decode_int8": _decode_spec(1),
    "decode_int4": _decode_spec(2),
    "decode_fp8": _decode_spec(3),
}


@dataclass
class Report:
    registers: int
    stack: int
    shared: int
    opcodes: collections.Counter
    sass: str


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_report(spec: Spec, arch: int = 90) -> Report:
    """Compile spec for sm_<arch> with the JIT's usual specializations (pointers and spec.div16 ints divisible by
    16) and read back the cubin's resource usage and SASS."""
    fn = spec.function()
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in spec.types.items()
             if t.startswith("*") or n in spec.div16}
    signature = {n: spec.types.get(n, "constexpr") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=spec.constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", path], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {usage[:200]!r}")
    opcodes = collections.Counter()
    for line in sass.splitlines():
        op = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if op:
            opcodes[op.group(1)] += 1
    return Report(int(m.group(1)), int(m.group(2)), int(m.group(3)), opcodes, sass)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel", action="append", choices=sorted(KERNELS), help="repeatable; default: all")
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer (default 90: Hopper)")
    p.add_argument("--top", type=int, default=12, help="opcodes to list per kernel")
    p.add_argument("--dump", metavar="DIR", help="also write each kernel's SASS to DIR/<kernel>.sass")
    args = p.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}")
    print(f"{'kernel':<12} {'regs':>4} {'stack':>5} {'shared':>6} {'instrs':>6}  top opcodes")
    for name in args.kernel or KERNELS:
        r = compile_report(KERNELS[name], args.arch)
        top = " ".join(f"{op} {n}" for op, n in r.opcodes.most_common(args.top))
        print(f"{name:<12} {r.registers:>4} {r.stack:>5} {r.shared:>6} {sum(r.opcodes.values()):>6}  {top}", flush=True)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"{name}.sass"), "w") as f:
                f.write(r.sass)


if __name__ == "__main__":
    sys.exit(main())
