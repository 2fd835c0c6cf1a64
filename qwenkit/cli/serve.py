"""`qwenkit serve`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import os
import sys

from qwenkit.cli.common import add_engine_flags, add_model_flags, engine_config, load_model_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_model_flags(p)
    add_engine_flags(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: from the checkpoint)")
    p.add_argument("--api-key", action="append", default=None, help="required Bearer key (repeatable; or env QWENKIT_API_KEY, comma-separated)")
    p.add_argument("--rate-limit-rpm", type=int, default=0, help="requests per minute per key (0: unlimited)")
    p.add_argument("--rate-limit-tpm", type=int, default=0, help="tokens per minute per key (0: unlimited)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--max-messages", type=int, default=512)
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest prompt text in characters, refused before tokenizing (default: 32 x the context length)")
    p.add_argument("--metrics-require-key", action="store_true",
                   help="/metrics needs the API key too (use when the server is reachable beyond loopback)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to finish requests in flight after SIGTERM; then they end with finish_reason abort")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="serve a PEFT-format LoRA adapter under NAME (repeatable); requests pick it with model=NAME")
    p.add_argument("--log-requests", action="store_true", help="log each request line (prompts and outputs are never logged)")
    media = p.add_argument_group("media (Qwen2-VL, Qwen2.5-VL, Qwen2-Audio)")
    media.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                       help="let requests read local files (file:// URLs or paths) under DIR (default: no local files)")
    media.add_argument("--allowed-media-domain", action="append", default=[], metavar="HOST",
                       help="let requests fetch http(s) media from HOST and its subdomains (repeatable; '*' for any). Off by default: data: URLs only")
    media.add_argument("--max-media-bytes", type=int, default=20 << 20, help="largest media item fetched or decoded, in bytes")
    media.add_argument("--media-fetch-timeout", type=float, default=10.0, help="seconds to fetch one media URL")
    media.add_argument("--max-media-pixels", type=int, default=None,
                       help="pixels per image or video frame after resizing: caps the checkpoint's max_pixels and what requests ask for")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qwenkit.engine.llm import AsyncLLM
    from qwenkit.errors import QwenkitError
    from pathlib import Path

    from qwenkit.multimodal.sources import MediaPolicy
    from qwenkit.server.app import serve
    from qwenkit.server.media import MediaServerConfig
    from qwenkit.server.state import ServerConfig

    keys = args.api_key or [k for k in os.environ.get("QWENKIT_API_KEY", "").split(",") if k]
    loaded = load_model_from_args(args)
    name = args.served_model_name or (loaded.path.stem if loaded.path.is_file() else loaded.path.name)
    llm = AsyncLLM(loaded, engine_config=engine_config(args), tensor_parallel_size=args.tensor_parallel_size)  # ranks > 0 serve rank 0 here, then exit
    for spec in args.lora:
        adapter_name, sep, directory = spec.partition("=")
        if not sep or not adapter_name or not directory:
            raise QwenkitError(f"--lora takes NAME=DIR, got {spec!r}")
        if adapter_name == name:
            raise QwenkitError(f"--lora name {adapter_name!r} is the base model's served name")
        llm.engine.add_lora(adapter_name, directory)  # the engine thread is idle: nothing is queued yet
    config = ServerConfig(
        served_model_name=name, api_keys=keys, requests_per_minute=args.rate_limit_rpm,
        tokens_per_minute=args.rate_limit_tpm, max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
        max_tokens_limit=args.max_tokens_limit, max_prompt_chars=args.max_prompt_chars,
        metrics_require_key=args.metrics_require_key,
        media=MediaServerConfig(
            MediaPolicy(
                allowed_local_path=Path(args.allowed_local_media_path) if args.allowed_local_media_path else None,
                allowed_domains=tuple(args.allowed_media_domain), max_bytes=args.max_media_bytes, timeout=args.media_fetch_timeout,
            ),
            max_pixels=args.max_media_pixels,
        ),
    )
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({'API key required' if keys else 'no API key'})",
          file=sys.stderr, flush=True)
    serve(llm, config, args.host, args.port, args.drain_timeout, args.log_requests)
    return 0
