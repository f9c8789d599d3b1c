"""Architecture name -> model class. Every supported architecture is listed in config.SUPPORTED_ARCHITECTURES."""
from ..config import SUPPORTED_ARCHITECTURES, ModelConfig
from .qwen3_5 import Qwen3_5ForCausalLM

MODEL_CLASSES = {arch: Qwen3_5ForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def model_class(cfg: ModelConfig):
    return MODEL_CLASSES[cfg.architecture]
