"""`qwenkit chat`: interactive or one-shot chat with the model's own template."""

from __future__ import annotations

import argparse
import os
import sys

from qwenkit.cli.common import add_engine_flags, add_model_flags, add_sampling_flags, load_llm, sampling_params

HELP = "commands: /reset clears the conversation, /exit quits"


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model (interactive, or one shot with -p)")
    p.add_argument("-p", "--prompt", default=None, help="one message; print only the reply and exit")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--url", default=None, help="chat with a running server instead (e.g. http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="Bearer key for --url (or env QWENKIT_API_KEY)")
    add_model_flags(p)
    add_engine_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=run)


def local_replies(args: argparse.Namespace):
    llm = load_llm(args)
    params = sampling_params(args, llm)

    def pieces(history: list[dict]):
        # Each turn is a new request; the prefix cache finds the earlier turns' blocks.
        prompt = llm.tokenizer.encode_chat(history)
        for out in llm.stream(prompt, params):
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

    if args.prompt is not None:
        reply([*base, {"role": "user", "content": args.prompt}])
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
        history.append({"role": "user", "content": line})
        try:
            answer = reply(history)
        except KeyboardInterrupt:  # stop this reply, keep the session
            print("\n(interrupted)", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})
