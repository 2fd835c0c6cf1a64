"""LoRA supervised fine-tuning: data, packing, the training loop, data-parallel processes."""
