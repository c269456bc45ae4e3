"""Hugging Face -> MLX conversion for Qwen3.6: the tensor rules (`hf`) shared by the loader and the converter."""
