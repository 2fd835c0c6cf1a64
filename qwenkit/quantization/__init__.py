"""Weight-only quantization for CPU decoding: nn.Linear swapped for int8 / int4 modules (gpt-fast style)."""
