"""Writes sft_train.jsonl / sft_eval.jsonl: a small arithmetic chat task for the LoRA tests.

The answers follow one fixed sentence, so a few LoRA steps on a tiny random model lower the
eval loss measurably. Both record formats appear: "messages" (with a system turn, sometimes
two user/assistant rounds) and "prompt"/"completion".
"""

import json
import random
from pathlib import Path


def record(rng: random.Random, i: int) -> dict:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    question, answer = f"what is {a} plus {b}?", f"the sum is {a + b}."
    if i % 3 == 0:
        return {"prompt": question, "completion": answer}
    messages = [{"role": "system", "content": "you add numbers."}, {"role": "user", "content": question},
                {"role": "assistant", "content": answer}]
    if i % 3 == 2:
        c = rng.randint(1, 9)
        messages += [{"role": "user", "content": f"and plus {c}?"}, {"role": "assistant", "content": f"the sum is {a + b + c}."}]
    return {"messages": messages}


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(0)
    for name, count in (("sft_train.jsonl", 48), ("sft_eval.jsonl", 12)):
        (here / name).write_text("".join(json.dumps(record(rng, i)) + "\n" for i in range(count)))


if __name__ == "__main__":
    main()
