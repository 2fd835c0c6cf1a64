"""Checkpoint formats (HF safetensors, GGUF), model resolution and loading: see loader.load_model."""
