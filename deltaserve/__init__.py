"""deltaserve: an inference and serving engine for Qwen3.5 (Gated DeltaNet + gated attention), dense and MoE."""
from .llm import LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
