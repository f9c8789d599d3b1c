#!/usr/bin/env bash
# GPU runs in named parts; logs go to $OUT (the device tool brings them back). Source scripts/gpu_env.sh first.
# Usage on the GPU machine: bash scripts/gpu_session.sh PART...
#   PART: tests parity kernels engine state tp quant offline
#   tests    the `gpu`-marked kernel and unit tests (one H200, 2026-11-29: ~470 s, so run it in a call of its own)
#   parity   bf16 engine against HF transformers (tests/e2e/test_gpu_parity.py, ~230 s alone), the piecewise
#            CUDA graphs against eager (tests/e2e/test_gpu_graphs.py, ~10 s) and mixed steps' decode rows on the
#            split-K kernel against the prefill kernel (tests/e2e/test_gpu_mixed.py, ~10 s)
#   kernels  int4 GEMM/MoE and attention (KV dtypes) benches
#   engine   deltaserve bench, Qwen3.5-9B shapes                   tp       two-GPU TP test and the all-reduce cost
#   quant    AWQ int4 presets (27B, 35B-A3B 8 layers) + bf16 twin  offline  the 1000 x (1024 -> 128) throughput profile
#   state    9B (8 layers) decode with the GDN state in float32, then bfloat16
# Two single-GPU part lists can run side by side: CUDA_VISIBLE_DEVICES=0 ... & CUDA_VISIBLE_DEVICES=1 ...
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
bench() { timeout "$1" python3 -m deltaserve.cli bench "${@:2}" 2>&1 | grep -v "it/s\|^INFO" | tail -12; }
for part in "$@"; do
  case $part in
    tests)
      timeout 560 python3 -m pytest -q -p no:cacheprovider -m gpu ${GPU_TESTS:-tests/kernels tests/unit} -rf \
        --durations=10 2>&1 | grep -vE "^\s*$" | tail -80 > "$OUT/gpu_tests.log" ;;
    parity)
      # the figures the tests print come first: a failure's traceback would push them out of the tail
      timeout 400 python3 -m pytest -q -p no:cacheprovider -m gpu tests/e2e/test_gpu_parity.py \
        tests/e2e/test_gpu_graphs.py tests/e2e/test_gpu_mixed.py -s 2>&1 | grep -vE "^\s*$" > "$OUT/gpu_parity.full"
      { grep -E "prompt logprob|greedy agreement|difference|passed|failed" "$OUT/gpu_parity.full"
        tail -30 "$OUT/gpu_parity.full"; } > "$OUT/gpu_parity.log" ;;
    kernels)
      { timeout 130 python3 benchmarks/kernels/bench_int4.py; timeout 110 python3 benchmarks/kernels/bench_attention.py \
        --kv-cache-dtype int8,int4,fp8 ${KV_SWEEP:+--sweep}; } > "$OUT/bench_kernels.log" 2>&1 ;;
    engine)
      bench 240 --preset qwen3.5-9b --prompt-lens 512,2048,8192 --batch-sizes 1,16,64 --context 1024 --steps 32 \
        > "$OUT/bench_9b.log" ;;
    state)
      for st in float32 bfloat16; do bench 60 --preset qwen3.5-9b --layers 8 --prompt-lens 512 --batch-sizes 64,256 \
        --context 1024 --steps 16 --state-dtype $st; done > "$OUT/bench_state.log" ;;
    tp)
      { timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/e2e/test_gpu_tp.py -s 2>&1 \
          | grep -E "prompt logprob|greedy:|passed|failed|Error|error" | tail -20
        timeout 60 python3 benchmarks/tp_allreduce.py --preset qwen3.5-27b --tp 2 --batch-sizes 1,16,64; } \
        > "$OUT/tp.log" 2>&1 ;;
    quant)
      { bench 150 --preset qwen3.5-27b --quantization awq --prompt-lens 2048 --batch-sizes 1,16,64 --context 1024 \
          --steps 32
        bench 100 --preset qwen3.5-35b-a3b --layers 8 --quantization awq --prompt-lens 2048 --batch-sizes 1,64 \
          --context 256 --steps 32
        bench 100 --preset qwen3.5-35b-a3b --layers 8 --prompt-lens 2048 --batch-sizes 1,64 --context 256 \
          --steps 32
        # the peer on the same 8-layer shapes (peer-baselines/hf_moe.py, carried in the ignored .peer/ folder)
        [ -f .peer/hf_moe.py ] && LAYERS=8 timeout 120 python3 .peer/hf_moe.py grouped_mm 2>&1 | tail -5
      } > "$OUT/bench_quant.log" ;;
    offline)
      timeout 200 python3 benchmarks/offline_throughput.py --preset qwen3.5-9b --num-prompts 1000 --input-len 1024 \
        --output-len 128 --max-num-seqs 512 --max-num-batched-tokens 8192 --step-stats 2>&1 | grep -v "it/s" \
        | tail -22 > "$OUT/offline.log" ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
