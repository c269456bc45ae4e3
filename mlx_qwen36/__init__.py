"""mlx-qwen36: Qwen3.6-35B-A3B and Qwen3.6-27B in MLX."""

import sys
import types

from .cache import GDNCache, KVCache
from .config import ConfigError, ModelConfig, TextConfig
from .generator import GenerationChunk, GenerationResult, generate, stream_generate
from .loader import CheckpointError, load, load_model
from .model import Model
from .prompt_cache import PromptCache, PromptCacheError, make_prompt_cache

__version__ = "0.1.0"


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # Importing the CLI `mlx_qwen36.generate` (python -m, the console script) would bind the submodule over the
        # library function `generate`, as the import system sets a package attribute for each submodule it loads.
        if not (name == "generate" and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["CheckpointError", "ConfigError", "GDNCache", "GenerationChunk", "GenerationResult", "KVCache", "Model",
           "ModelConfig", "PromptCache", "PromptCacheError", "TextConfig", "generate", "load", "load_model",
           "make_prompt_cache", "stream_generate"]
