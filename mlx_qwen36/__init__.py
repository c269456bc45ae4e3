"""mlx-qwen36: Qwen3.6-35B-A3B and Qwen3.6-27B in MLX."""

from .cache import GDNCache, KVCache
from .config import ConfigError, ModelConfig, TextConfig
from .loader import CheckpointError, load, load_model
from .model import Model

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "GDNCache", "KVCache", "Model", "ModelConfig", "TextConfig", "load",
           "load_model"]
