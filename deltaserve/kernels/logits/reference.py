"""Torch reference of the logits GEMM (CPU path, CUDA prefill path and kernel oracle)."""
import torch
import torch.nn.functional as F


def logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [M, H]; weight [V, H] -> [M, V] fp32. On CUDA a 16-bit GEMM writes its fp32 accumulators directly."""
    if hidden.is_cuda and hidden.dtype != torch.float32:
        return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    return F.linear(hidden, weight).float()
