"""mlx-qwen36: Qwen3.6-35B-A3B and Qwen3.6-27B in MLX."""

from .cache import GDNCache, KVCache
from .config import ConfigError, ModelConfig, TextConfig
from .generator import GenerationChunk, GenerationResult, generate, stream_generate
from .loader import CheckpointError, load, load_model
from .model import Model
from .prompt_cache import PromptCache, PromptCacheError, make_prompt_cache

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "GDNCache", "GenerationChunk", "GenerationResult", "KVCache", "Model",
           "ModelConfig", "PromptCache", "PromptCacheError", "TextConfig", "generate", "load", "load_model",
           "make_prompt_cache", "stream_generate"]
