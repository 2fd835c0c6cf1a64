"""Flags shared by the CLI commands, and turning them into a model and sampling parameters."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the engine takes seconds; `qwenkit pull` and `qwenkit models` never need it
    from qwenkit.engine.sampling_params import SamplingParams


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="checkpoint directory, .gguf file or hub id (default: the embedded Qwen2.5-Coder-0.5B-Instruct)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="dtype of activations and float weights; given for a GGUF, it loads the exact float reference")
    parser.add_argument("--quantize", default="auto", choices=["auto", "none", "gguf", "int8", "int4"],
                        help="auto: a GGUF runs its quantized blocks in place (unless --dtype is given); "
                             "int8/int4: weight-only quantization of the linear layers at load time; none: float")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64, 128, 256)")
    add_hub_flags(parser)
    parser.add_argument("--mmproj", default=None, metavar="FILE",
                        help="a GGUF model's vision tower (llama.cpp's mmproj file, Qwen2-VL / Qwen2.5-VL); "
                             "default: the one beside the GGUF in its directory or hub repo")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="tokens of context (prompt + output); default: the model's, scaled by --rope-scaling")
    parser.add_argument("--rope-scaling", default=None, metavar="JSON",
                        help='e.g. \'{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":32768}\' '
                             "(Qwen's recipe for 131,072 tokens): the context becomes factor x original")


def add_hub_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None, help="hub ids: branch, tag or commit to pin (default: the default branch: main on Hugging Face, master on ModelScope)")
    parser.add_argument("--source", default=None, choices=["huggingface", "modelscope"],
                        help="hub ids: where to download from (default: modelscope if QWENKIT_USE_MODELSCOPE=1, else huggingface)")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache-gb", type=float, default=1.0, help="memory for the paged KV cache (GiB)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="most sequences decoded together")
    parser.add_argument("--no-prefix-caching", action="store_true", help="recompute shared prompt prefixes")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="auto: float16 for GGUF blocks in place (as llama.cpp), else the model's dtype")
    parser.add_argument("--speculative", default=None, metavar="ngram|draft:PATH",
                        help="speculative decoding, exact (greedy output and sampling distribution unchanged): "
                             "ngram drafts by prompt lookup (copies from the prompt and output), draft:PATH with a "
                             "smaller model sharing the tokenizer")
    parser.add_argument("--num-speculative-tokens", type=int, default=8, help="most tokens drafted per sequence and step")
    parser.add_argument("--no-jump-forward", action="store_true",
                        help="decode a grammar's forced text token by token instead of verifying it as one draft")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="shard the model over N processes started by torchrun --nproc-per-node N (rank 0 "
                             "schedules and samples; the others run their shards)")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    # Unset flags fall back to the checkpoint's generation_config.json (or llama.cpp's defaults for GGUF).
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=None, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)


def sampling_params(args: argparse.Namespace, llm) -> SamplingParams:
    return llm.engine.default_sampling_params(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
    )


def engine_config(args: argparse.Namespace):
    from qwenkit.engine.llm_engine import EngineConfig

    return EngineConfig(
        kv_cache_memory=int(getattr(args, "kv_cache_gb", 1.0) * (1 << 30)),
        max_num_seqs=getattr(args, "max_num_seqs", 64),
        enable_prefix_caching=not getattr(args, "no_prefix_caching", False),
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
        speculative=getattr(args, "speculative", None),
        num_speculative_tokens=getattr(args, "num_speculative_tokens", 8),
        jump_forward=not getattr(args, "no_jump_forward", False),
    )


def load_llm(args: argparse.Namespace):
    from qwenkit.engine.llm import LLM

    if sys.stderr.isatty():
        print("loading model...", file=sys.stderr, flush=True)
    return LLM(load_model_from_args(args), engine_config=engine_config(args), tensor_parallel_size=args.tensor_parallel_size)


def load_model_from_args(args: argparse.Namespace):
    from qwenkit.engine.tensor_parallel import tensor_parallel_group
    from qwenkit.weights.loader import load_model

    group = tensor_parallel_group(getattr(args, "tensor_parallel_size", 1))  # a wrong size fails before the model loads
    return load_model(
        args.model, args.dtype, None if args.quantize == "none" else args.quantize, args.group_size,
        max_model_len=args.max_model_len, rope_scaling=args.rope_scaling, revision=args.revision, source=args.source,
        mmproj=args.mmproj, tensor_parallel=group,  # each process reads only its shard
    )
