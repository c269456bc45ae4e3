"""Hugging Face -> MLX conversion for Qwen3.6: the tensor rules shared with the loader, and the converter.

`from mlx_qwen36.convert import convert`; the converter is imported on first use, because the loader imports the
tensor rules from this package and the converter imports the loader.
"""

from typing import Any

__all__ = ["ConversionError", "ConvertOptions", "ConvertSummary", "convert"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import converter

        return getattr(converter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
