"""LoRA adapters: layers, the PEFT on-disk format, attaching to and merging into a model."""
