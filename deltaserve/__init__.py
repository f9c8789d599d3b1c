"""deltaserve: an inference and serving engine for Qwen3.5 (Gated DeltaNet + gated attention), dense and MoE."""
from typing import TYPE_CHECKING

from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .llm import LLM

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM (and with it torch, a second or more) is imported on first use, not with the package: the `deltaserve`
    # console script imports deltaserve.cli before main() runs, and a Ctrl-C during that import was a traceback
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(f"module 'deltaserve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
