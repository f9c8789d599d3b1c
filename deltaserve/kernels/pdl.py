"""Programmatic dependent launch (PDL, Hopper and newer) for the kernels of a decode step.

A kernel launched with `launch_pdl=True` may be scheduled while the kernel before it on the stream is still running,
once every program of that one has called `griddepcontrol.launch_dependents`. Each kernel here starts with
`pdl_start`: `griddepcontrol.wait` first (block until the kernel before has completed and its writes are visible,
so nothing a program reads can be stale), then `launch_dependents` (let the next kernel's programs be placed now).
What is saved is the gap between two small kernels: the next grid's launch and placement overlap the tail of the
one before. H200, a CUDA graph of 200 dependent copy kernels: 0.94 -> 0.67 us a kernel (8 programs), 1.27 -> 0.78
(128 programs). A kernel after a non-PDL one (cuBLAS, torch) starts as usual; `griddepcontrol` is a no-op there.

Work before the wait. When a program starts, only the kernel launched right before it may still be running: that
one called `launch_dependents` after its own wait, so everything launched earlier has completed and its writes are
visible. A kernel may therefore read, before `pdl_start`, anything its predecessor does not write, and overlap that
latency with it: the GDN decode loads its state tile and conv windows (written by itself, a step earlier) while the
in-projection GEMV streams, the fused router its weight rows, and small int4 GEMVs ask L2 for their weights
(`prefetch_l2`). H200, `deltaserve bench --preset qwen3.5-35b-a3b --layers 8 --quantization awq`, batch 1, two
alternations against the tree before (2026-12-01): 0.726 / 0.725 -> 0.713 / 0.709 ms a step; Qwen3.5-27B shapes
(mixed AWQ) 8.712 / 8.702 -> 8.687 / 8.686 ms. tests/kernels/test_pdl.py replays such chains against eager launches
bit for bit (a GDN decode reading its input before the wait fails it).

`pdl_args(t)` gives the launch keywords for a kernel whose inputs live with `t`: PDL for launches being captured
into a CUDA graph (the decode steps) on a device of compute capability 9+ under a Triton that has it; nothing
elsewhere (eager launches, CPU, the interpreter). Eager prefill measured slower with it (H200, Qwen3.5-9B shapes cut
to 8 layers, two alternations: a 512-token prompt 15.1 / 15.6 -> 16.2 / 16.7 ms, 2048 tokens 16.2 / 16.5 -> 16.9 /
16.6 ms) while the captured decode step gained. DELTASERVE_PDL=0 turns it off."""
import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda.gdc import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # Triton < 3.4: no griddepcontrol wrappers; USE_PDL stays False, these are never traced
    _HAS_GDC = False
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_start(USE_PDL: tl.constexpr):
    """First statement of a kernel launched through pdl_args (USE_PDL False: nothing)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, USE_PDL: tl.constexpr):
    """Before pdl_start: ask L2 for the 128-byte lines at ptrs (a hint: no result, any address the kernel may read).
    Under PDL the program already sits on its SM while the kernel before it runs, so data no recent kernel writes
    (weights) can be on its way before the wait."""
    if USE_PDL:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


_ON = {"USE_PDL": True, "launch_pdl": True}
_OFF: dict = {}


@functools.cache
def _enabled(index: int) -> bool:
    # programmatic (PDL) edges in CUDA graphs came with CUDA 12.3 (graph edge data)
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return (_HAS_GDC and os.environ.get("DELTASERVE_PDL", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"
            and cuda >= (12, 3) and torch.cuda.get_device_capability(index)[0] >= 9)


def pdl_args(t: torch.Tensor) -> dict:
    """Launch keywords for a pdl_start kernel working on t's device: {USE_PDL, launch_pdl} while a CUDA graph is
    being captured (module docstring), else none."""
    if t.is_cuda and torch.cuda.is_current_stream_capturing() \
            and _enabled(t.device.index if t.device.index is not None else torch.cuda.current_device()):
        return _ON
    return _OFF
