"""Kernels: each package holds a torch reference (the CPU path and the oracle) and its Triton kernels (CUDA).

The Triton kernels are written and measured with floating-point contraction on: ptxas fuses a * b + c into one FFMA
(the int4 GEMV's inner loop is one FMA a weight). Triton 3.9 warns that 3.10 turns contraction off by default, so the
default is pinned on here, before any kernel compiles; a TRITON_DEFAULT_FP_FUSION set by the user wins."""
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
