"""Checkpoint files as data: the GGUF container and its block types, safetensors directories,
config from GGUF metadata. Nothing here builds a model or knows about quantized layers."""
