"""Helpers the kernel tests share (imported by name: pytest puts this folder on sys.path)."""
import torch


def replay_after_new_input(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Capture y = fn(x) in a CUDA graph (fn runs once before, so compilation stays outside the capture), write new
    values into x, replay -> (the replayed y, fn run eagerly on the new x)."""
    fn(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    return y, fn(x)
