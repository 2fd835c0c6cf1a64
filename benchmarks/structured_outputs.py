"""Structured outputs on the default model (issue 18): 20 JSON schemas x 3 prompts, every output
checked with `jsonschema`, constrained vs the same prompts unconstrained (schema given in the
prompt only); then the decode overhead of a JSON schema at batch 1 and 16 (tokens/s with and
without the grammar, same prompts, greedy, interleaved runs) and the share of the constrained
runs' wall time spent filling and applying the token bitmask; then jump-forward: the 20 schemas
one request at a time, greedy, with the grammar's forced text verified as a draft vs decoded token
by token (same outputs required, tokens/s of each, interleaved).

    python benchmarks/structured_outputs.py [--quick] [--only validity|overhead|jump]
"""

from __future__ import annotations

import argparse
import json
import re
import time

import jsonschema

from qwenkit.engine.llm import LLM
from qwenkit.engine.llm_engine import EngineConfig
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.structured import GuidedDecoding
from qwenkit.structured.processor import GrammarProcessor
from qwenkit.weights.loader import load_model

S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required}


SCHEMAS = [
    ("a person", obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 130}})),
    ("a book", obj({"title": S, "author": S, "year": {"type": "integer", "minimum": 1400, "maximum": 2030}})),
    ("the weather", obj({"city": S, "temperature_c": {"type": "number", "minimum": -90, "maximum": 60}, "unit": {"enum": ["C", "F"]}})),
    ("a todo list", obj({"items": {"type": "array", "items": S, "minItems": 1, "maxItems": 4}})),
    ("a product", obj({"name": S, "price": {"type": "number", "exclusiveMinimum": 0}, "in_stock": B})),
    ("a color", obj({"name": S, "rgb": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}, "minItems": 3, "maxItems": 3}})),
    ("an address", obj({"street": S, "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})),
    ("a movie", obj({"title": S, "genre": {"enum": ["drama", "comedy", "action", "horror", "sci-fi"]}, "rating": {"type": "number", "minimum": 0, "maximum": 10}})),
    ("a company", obj({"name": S, "ceo": obj({"name": S, "age": I}), "employees": {"type": "integer", "minimum": 1}})),
    ("a recipe", obj({"dish": S, "ingredients": {"type": "array", "items": obj({"name": S, "grams": {"type": "integer", "minimum": 1}}), "minItems": 1, "maxItems": 3}})),
    ("a user profile", obj({"username": {"type": "string", "pattern": "^[a-z0-9_]{3,12}$"}, "email": S, "nickname": S}, ["username", "email"])),
    ("an event", obj({"name": S, "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}, "attendees": {"type": "integer", "minimum": 0}})),
    ("a measurement", obj({"value": {"anyOf": [N, {"type": "null"}]}, "unit": {"enum": ["m", "kg", "s"]}})),
    ("an answer", obj({"answer": {"anyOf": [S, I]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("a country", obj({"name": S, "capital": S, "population_millions": {"type": "number", "minimum": 0}, "languages": {"type": "array", "items": S, "maxItems": 3}})),
    ("a car", obj({"make": S, "model": S, "electric": B, "doors": {"enum": [2, 3, 4, 5]}})),
    ("a flight", obj({"from": {"type": "string", "pattern": "^[A-Z]{3}$"}, "to": {"type": "string", "pattern": "^[A-Z]{3}$"}, "stops": {"type": "integer", "minimum": 0, "maximum": 3}})),
    ("a pet", obj({"kind": {"enum": ["cat", "dog", "bird"]}, "name": S, "age": {"type": "integer", "minimum": 0, "maximum": 40}, "vaccinated": B}, ["kind", "name"])),
    ("a server config", obj({"host": S, "port": {"type": "integer", "minimum": 1, "maximum": 65535}, "tls": obj({"enabled": B, "cert": S}, ["enabled"])})),
    ("a shape", {"anyOf": [obj({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}}),
                           obj({"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0}})]}),
]
PROMPTS = ["Give me {x} as JSON.", "Describe {x}. Answer with a JSON object only.", "I need {x} for a test fixture, in JSON."]


def chat(llm: LLM, text: str) -> str:
    return llm.tokenizer.chat_template.render([{"role": "user", "content": text}], add_generation_prompt=True)


def first_json(text: str):
    """What a caller of an unconstrained model would try: the first {...} in the reply."""
    match = re.search(r"\{.*\}", text, re.S)
    return json.loads(match.group(0)) if match else json.loads(text)


def validity(llm: LLM, max_tokens: int) -> None:
    jobs = [(schema, PROMPTS[k].format(x=x)) for x, schema in SCHEMAS for k in range(len(PROMPTS))]
    for constrained in (True, False):
        params = []
        for schema, _ in jobs:
            extra = (GuidedDecoding.from_json_schema(schema),) if constrained else ()
            params.append(SamplingParams(max_tokens=max_tokens, temperature=0, logits_processors=extra))
        prompts = [chat(llm, q if constrained else f"{q} Schema: {json.dumps(schema)}") for schema, q in jobs]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t0
        valid = parsed = 0
        failures = []
        for (schema, q), out in zip(jobs, outs):
            text = out.outputs[0].text
            try:
                value = json.loads(text) if constrained else first_json(text)
                parsed += 1
                jsonschema.validate(value, schema)
                valid += 1
            except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
                failures.append((q, text[:80], type(exc).__name__))
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        label = "constrained  " if constrained else "unconstrained"
        print(f"{label}: {parsed}/{len(jobs)} parse, {valid}/{len(jobs)} valid, {tokens} tokens in {elapsed:.1f} s", flush=True)
        for f in failures[:5]:
            print("   ", f)


class GrammarClock:
    """Time spent inside the grammar's batched mask fill + apply (GrammarProcessor.apply), so its
    share of a run's wall time can be reported next to tokens/s (which the load of a shared
    machine blurs: both are measured in the same run)."""

    def __init__(self):
        self.seconds = 0.0
        self._apply = GrammarProcessor.apply.__func__

        def timed(cls, logits, rows, processors):
            t0 = time.perf_counter()
            try:
                self._apply(cls, logits, rows, processors)
            finally:
                self.seconds += time.perf_counter() - t0

        GrammarProcessor.apply = classmethod(timed)


def overhead(llm: LLM, batch: int, tokens: int, clock: GrammarClock, rounds: int = 3) -> None:
    # A string that must be longer than the run: both runs last exactly `tokens` tokens.
    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 100000}}, "required": ["story"]}
    prompts = [chat(llm, f"Tell story number {i} about the sea, as JSON.") for i in range(batch)]
    rates: dict[bool, list[float]] = {}
    inside = wall = 0.0
    for constrained in (False, True) * rounds:  # interleaved: the machine's load drifts
        extra = (GuidedDecoding.from_json_schema(schema),) if constrained else ()
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0, logits_processors=extra)
        before = clock.seconds
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t0
        if constrained:
            inside, wall = inside + clock.seconds - before, wall + elapsed
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        rates.setdefault(constrained, []).append(n / elapsed)
    plain, guided = max(rates[False]), max(rates[True])
    pairs = sorted(g / p for p, g in zip(rates[False], rates[True]))
    print(f"batch {batch:2d}: best {plain:.1f} tok/s plain, {guided:.1f} tok/s with a JSON schema: {guided / plain:.3f}x "
          f"(median of {rounds} interleaved pairs {pairs[len(pairs) // 2]:.3f}x); mask fill + apply "
          f"{inside / wall * 100:.1f}% of the constrained runs' wall time", flush=True)


def jump_forward(loaded, max_tokens: int) -> None:
    plain = LLM(loaded, engine_config=EngineConfig(jump_forward=False))
    jumping = LLM(loaded, engine_config=EngineConfig(jump_forward=True))
    seconds = {False: 0.0, True: 0.0}
    tokens, same = 0, 0
    for k, (x, schema) in enumerate(SCHEMAS):
        prompt = chat(plain, PROMPTS[0].format(x=x))
        params = SamplingParams(max_tokens=max_tokens, temperature=0, logits_processors=(GuidedDecoding.from_json_schema(schema),))
        outs = {}
        for on in ((False, True) if k % 2 == 0 else (True, False)):  # alternate who goes first: the load drifts
            llm = jumping if on else plain
            t0 = time.perf_counter()
            outs[on] = llm.generate([prompt], params)[0].outputs[0].token_ids
            seconds[on] += time.perf_counter() - t0
        tokens += len(outs[False])
        same += outs[False] == outs[True]
    stats = jumping.engine.speculator.stats
    print(f"jump-forward, {len(SCHEMAS)} schemas one at a time, {tokens} tokens: {tokens / seconds[False]:.1f} tok/s token by token, "
          f"{tokens / seconds[True]:.1f} tok/s with jump-forward ({seconds[False] / seconds[True]:.2f}x); outputs identical "
          f"{same}/{len(SCHEMAS)}; {stats.num_forced_accepted_tokens} of {stats.num_forced_draft_tokens} forced tokens kept "
          f"({stats.num_forced_accepted_tokens / tokens:.0%} of the output)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer tokens")
    parser.add_argument("--only", choices=["validity", "overhead", "jump"], help="run one of the parts")
    args = parser.parse_args()
    loaded = load_model(None)
    llm = LLM(loaded)
    if args.only in (None, "validity"):
        validity(llm, 48 if args.quick else 96)
    if args.only in (None, "overhead"):
        clock = GrammarClock()
        for batch in (1, 16):
            overhead(llm, batch, 16 if args.quick else 32, clock)
    if args.only in (None, "jump"):
        jump_forward(loaded, 48 if args.quick else 96)


if __name__ == "__main__":
    main()
