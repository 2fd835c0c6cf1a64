"""`qwenkit chat`: interactive or one-shot chat with the model's own template."""

from __future__ import annotations

import argparse
import sys

from qwenkit.cli.common import add_engine_flags, add_model_flags, add_sampling_flags, load_llm, sampling_params

HELP = "commands: /reset clears the conversation, /exit quits"


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model (interactive, or one shot with -p)")
    p.add_argument("-p", "--prompt", default=None, help="one message; print only the reply and exit")
    p.add_argument("--system", default=None, help="system prompt")
    add_model_flags(p)
    add_engine_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    params = sampling_params(args, llm)
    base = [{"role": "system", "content": args.system}] if args.system else []

    def reply(history: list[dict]) -> str:
        # Each turn is a new request; the prefix cache finds the earlier turns' blocks.
        prompt = llm.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        text = ""
        for out in llm.stream(prompt, params):
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
            text = out.outputs[0].text
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
