"""`qwenkit chat`: interactive or one-shot chat with the model's own template."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qwenkit.cli.common import add_engine_flags, add_model_flags, add_sampling_flags, load_llm, sampling_params

HELP = "commands: /reset clears the conversation, /exit quits"


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model (interactive, or one shot with -p)")
    p.add_argument("-p", "--prompt", default=None, help="one message; print only the reply and exit")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--url", default=None, help="chat with a running server instead (e.g. http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="Bearer key for --url (or env QWENKIT_API_KEY)")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image with the first message (repeatable; Qwen2-VL / Qwen2.5-VL)")
    p.add_argument("--audio", action="append", default=[], metavar="FILE", help="an audio clip with the first message (repeatable; Qwen2-Audio)")
    add_model_flags(p)
    add_engine_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=run)


def with_media(text: str, images: list[str], audios: list[str]) -> str | list[dict]:
    """A user message's content: the files as content parts (local paths), then the text."""
    if not images and not audios:
        return text
    parts = [{"type": "image", "image": str(Path(f).resolve())} for f in images]
    parts += [{"type": "audio", "audio": str(Path(f).resolve())} for f in audios]
    return parts + [{"type": "text", "text": text}]


def local_replies(args: argparse.Namespace):
    from qwenkit.engine.llm import media_context
    from qwenkit.engine.media_chat import chat_media
    from qwenkit.multimodal.sources import LIBRARY_POLICY

    llm = load_llm(args)
    params = sampling_params(args, llm)

    ctx = media_context(llm.engine, LIBRARY_POLICY)

    def pieces(history: list[dict]):
        # Each turn is a new request; the prefix cache (keyed by media content too) finds the earlier
        # turns' blocks, and the encoder cache the earlier turns' images.
        messages, media = chat_media(history, ctx)
        prompt = llm.tokenizer.encode_chat(messages)
        for out in llm.stream(prompt, params, media=media):
            yield out.outputs[0].delta_text

    return pieces


def remote_replies(args: argparse.Namespace):
    from qwenkit.cli.remote import RemoteChat

    remote = RemoteChat(
        args.url, args.api_key or os.environ.get("QWENKIT_API_KEY"), args.model,
        {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
         "min_p": args.min_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed},
    )
    return remote.stream


def run(args: argparse.Namespace) -> int:
    if args.url and (args.image or args.audio):
        print("--image/--audio work with a local model; with --url send them through the API", file=sys.stderr)
        return 2
    pieces = remote_replies(args) if args.url else local_replies(args)
    base = [{"role": "system", "content": args.system}] if args.system else []

    def reply(history: list[dict]) -> str:
        text = ""
        for piece in pieces(history):
            sys.stdout.write(piece)
            sys.stdout.flush()
            text += piece
        sys.stdout.write("\n")
        return text

    attached = [args.image, args.audio]  # go with the first user message
    if args.prompt is not None:
        reply([*base, {"role": "user", "content": with_media(args.prompt, *attached)}])
        return 0

    history = list(base)
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(base)
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": with_media(line, *attached)})
        try:
            answer = reply(history)
        except KeyboardInterrupt:  # stop this reply, keep the session
            print("\n(interrupted)", file=sys.stderr)
            history.pop()  # its attachments go with the next message instead
            continue
        attached = [[], []]
        history.append({"role": "assistant", "content": answer})
