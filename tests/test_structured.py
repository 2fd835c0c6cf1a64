"""Grammar-constrained decoding: spec checks, compile errors, the mask against a reference
computed independently over the vocabulary, and short runs of the default model."""

import json
import re

import jsonschema
import pytest
import torch

from qwenkit.engine.logits_process import ProcessorContext
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.errors import QwenkitError
from qwenkit.structured import GuidedDecoding
from qwenkit.structured.processor import GrammarProcessor


@pytest.fixture(scope="module")
def tokenizer():
    from qwenkit.formats.gguf_reader import GGUFFile
    from qwenkit.tokenizer.tokenizer import Tokenizer
    from qwenkit.weights.default_model import ensure_assembled

    return Tokenizer.from_gguf(GGUFFile(ensure_assembled()))


def context(tokenizer, spec):
    return ProcessorContext(tokenizer, SamplingParams(logits_processors=(spec,)), [], False)


def test_spec_needs_exactly_one_kind():
    with pytest.raises(QwenkitError, match="exactly one"):
        GuidedDecoding()
    with pytest.raises(QwenkitError, match="exactly one"):
        GuidedDecoding(regex="a", choice=("b",))
    with pytest.raises(QwenkitError, match="non-empty"):
        GuidedDecoding(choice=())
    with pytest.raises(QwenkitError, match="not valid JSON"):
        GuidedDecoding.from_json_schema("{nope")
    # The same schema as a dict or as text with other spacing is one cache key; another property order
    # is another schema (the output follows it, see test_a_schemas_property_order_is_the_outputs).
    assert GuidedDecoding.from_json_schema({"a": 2, "b": 1}) == GuidedDecoding.from_json_schema('{ "a":2,\n "b": 1}')
    assert GuidedDecoding.from_json_schema({"b": 1, "a": 2}) != GuidedDecoding.from_json_schema({"a": 2, "b": 1})


@pytest.mark.parametrize("spec, reason", [
    (GuidedDecoding.from_json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "missing"),
    (GuidedDecoding(regex="(unclosed"), "regex"),
    (GuidedDecoding(grammar="root ::= undefined_rule"), "undefined_rule"),
])
def test_uncompilable_spec_is_one_line_naming_why(tokenizer, spec, reason):
    with pytest.raises(QwenkitError) as info:
        spec(context(tokenizer, spec))
    message = str(info.value)
    assert "cannot be compiled" in message and reason in message and "\n" not in message


def allowed_after_apply(tokenizer, processors, width):
    logits = torch.zeros(len(processors) + 1, width)  # the last row carries no grammar
    GrammarProcessor.apply(logits, list(range(len(processors))), processors)
    assert torch.isfinite(logits[-1]).all()
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits[:-1]]


def test_mask_matches_a_reference_over_the_vocabulary(tokenizer):
    """The first token of `[0-9]{2}x` may be any vocabulary entry that is a prefix of such a
    string ("1", "12", "12x"...), and nothing else; checked with Python's re over every token."""
    width = tokenizer.vocab_size + 7  # logits wider than the vocabulary, as the model's are
    spec_regex = GuidedDecoding(regex="[0-9]{2}x")
    spec_choice = GuidedDecoding(choice=("yes", "no"))
    processors = [spec_regex(context(tokenizer, spec_regex)), spec_choice(context(tokenizer, spec_choice))]
    allowed_regex, allowed_choice = allowed_after_apply(tokenizer, processors, width)
    prefix = re.compile(r"[0-9]([0-9]x?)?")
    texts = {i: tokenizer.decode([i]) for i in range(tokenizer.vocab_size)}
    specials = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
    expected = {i for i, t in texts.items() if i not in specials and t and prefix.fullmatch(t)}
    assert allowed_regex == expected
    expected_choice = {i for i, t in texts.items() if i not in specials and t and ("yes".startswith(t) or "no".startswith(t))}
    assert allowed_choice == expected_choice

    # After "12x" the grammar is complete: only the end-of-turn tokens remain, then it finishes.
    for token in tokenizer.encode("12x", add_special_tokens=False):
        processors[0].accept(token)
    (after,) = allowed_after_apply(tokenizer, processors[:1], width)
    assert after == set(tokenizer.stop_token_ids)
    processors[0].accept(tokenizer.token_to_id("<|im_end|>"))
    assert processors[0].is_finished()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_finished_grammar_ends_the_output_before_min_tokens(tokenizer, temperature):
    """min_tokens holds back the end-of-text tokens, which are all a complete grammar allows: the
    grammar wins (its output must parse), so the row samples an end token instead of a token the
    grammar refuses (found by the server's schema fuzzing: `guided_regex` with `min_tokens`)."""
    from qwenkit.engine.sampler import SamplingRow, sample

    spec = GuidedDecoding(regex="[0-9]{2}")
    processor = spec(context(tokenizer, spec))
    digits = tokenizer.encode("12", add_special_tokens=False)
    for token in digits:
        processor.accept(token)
    width = tokenizer.vocab_size + 5
    logits = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    params = SamplingParams(max_tokens=10, min_tokens=6, temperature=temperature, logprobs=2)
    blocked = frozenset(tokenizer.stop_token_ids)
    rows = [SamplingRow(params, [1, 2, *digits], 2, torch.Generator().manual_seed(1), blocked, []),
            SamplingRow(params, [1, 2, *digits], 2, torch.Generator().manual_seed(1), blocked, [processor])]
    tokens, logprobs = sample(logits, rows)
    assert tokens[1] in tokenizer.stop_token_ids
    assert tokens[0] not in tokenizer.stop_token_ids  # min_tokens still holds where nothing conflicts
    assert torch.equal(logits, before)  # the second pass worked on a copy: the caller's logits are intact
    assert logprobs[1].logprob == pytest.approx(float(torch.log_softmax(before[1], -1)[tokens[1]]))
    processor.accept(tokens[1])
    assert processor.is_finished()


def test_waits_for_the_end_of_thinking(tokenizer):
    spec = GuidedDecoding(choice=("yes",))
    processor = spec(context(tokenizer, spec))
    # The default model has no </think> token: stand in another id for the end of reasoning.
    end_of_thinking = tokenizer.token_to_id("<|im_start|>")
    processor.wait_for_token = end_of_thinking
    assert allowed_after_apply(tokenizer, [processor], tokenizer.vocab_size) == [set(range(tokenizer.vocab_size))]
    processor.accept(tokenizer.encode("no", add_special_tokens=False)[0])  # reasoning: not constrained
    processor.accept(end_of_thinking)
    (allowed,) = allowed_after_apply(tokenizer, [processor], tokenizer.vocab_size)
    assert tokenizer.encode("yes", add_special_tokens=False)[0] in allowed and len(allowed) < 10


def test_drafted_positions_get_the_mask_the_grammar_has_there(tokenizer):
    """Verification masks each drafted position as if the drafts before it were accepted: compared
    with a second matcher that really accepts them one by one; the sequence's own matcher is left
    as it was; after a draft the grammar refuses, later positions are not constrained (never reached)."""
    spec = GuidedDecoding.from_json_schema(PERSON)
    processor = spec(context(tokenizer, spec))
    drafted = tokenizer.encode('{"name": "Al", "age": 4', add_special_tokens=False)
    width = tokenizer.vocab_size + 3
    views = [processor.after_draft(drafted[:i]) for i in range(len(drafted) + 1)]
    logits = torch.zeros(len(views) + 1, width)
    rows = list(range(len(views)))
    from qwenkit.engine.logits_process import apply_processors
    assert not apply_processors(logits, [[v] for v in views] + [[]])  # one call per class, all positions at once
    got = [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits[:-1]]
    reference = spec(context(tokenizer, spec))
    for i in rows:
        (expected,) = allowed_after_apply(tokenizer, [reference], width)
        assert got[i] == expected, i
        if i < len(drafted):
            reference.accept(drafted[i])
    fresh = spec(context(tokenizer, spec))
    assert allowed_after_apply(tokenizer, [processor], width) == allowed_after_apply(tokenizer, [fresh], width)
    assert processor.forced_tokens() == fresh.forced_tokens() and tokenizer.decode(processor.forced_tokens()).startswith('{"')
    bad = drafted[:3] + tokenizer.encode("]]]", add_special_tokens=False) + drafted[3:5]
    logits = torch.zeros(len(bad) + 1, width)
    apply_processors(logits, [[processor.after_draft(bad[:i])] for i in range(len(bad) + 1)])
    assert not torch.isfinite(logits[3, bad[3]])  # the refused draft cannot be sampled at its position
    assert torch.isfinite(logits[4:]).all()  # so the rows after it are left alone


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
PET = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
       "required": ["kind", "legs"], "additionalProperties": False}


@pytest.mark.real_model
def test_default_model_output_follows_the_grammar_in_one_batch(gguf_model):
    from qwenkit.engine.llm import LLM

    llm = LLM(gguf_model)
    asks = [("Give a person as JSON.", GuidedDecoding.from_json_schema(PERSON)),
            ("Describe a pet as JSON.", GuidedDecoding.from_json_schema(PET)),
            ("Is Paris in France?", GuidedDecoding(choice=("yes", "no"))),
            ("Give a phone number.", GuidedDecoding(regex=r"[0-9]{3}-[0-9]{4}"))]
    prompts = [llm.tokenizer.chat_template.render([{"role": "user", "content": q}], add_generation_prompt=True) for q, _ in asks]
    outs = llm.generate(prompts, [SamplingParams(max_tokens=32, temperature=0, logits_processors=(s,)) for _, s in asks])
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), texts  # ended by the grammar, not the length
    jsonschema.validate(json.loads(texts[0]), PERSON)
    jsonschema.validate(json.loads(texts[1]), PET)
    assert texts[2] in ("yes", "no")
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", texts[3])


PROFILE = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                "required": ["street", "city"], "additionalProperties": False},
    "skills": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "age", "address", "skills"], "additionalProperties": False}


@pytest.mark.real_model
def test_jump_forward_output_is_the_models_own(gguf_model):
    """The grammar's forced text is drafted and verified: greedy and seeded sampling give the same
    tokens as decoding one token at a time, a batch too, in fewer steps; with prompt lookup on as well."""
    from qwenkit.engine.llm import LLM
    from qwenkit.engine.llm_engine import EngineConfig

    spec = GuidedDecoding.from_json_schema(PROFILE)
    chats = [[{"role": "user", "content": f"Invent a person's profile number {i} as JSON."}] for i in range(3)]
    params = [SamplingParams(max_tokens=120, temperature=0, logits_processors=(spec,)),
              SamplingParams(max_tokens=120, temperature=0.8, seed=7, logits_processors=(spec,)),
              SamplingParams(max_tokens=120, temperature=1.0, top_p=0.9, seed=11, logits_processors=(spec,))]
    plain = LLM(gguf_model, engine_config=EngineConfig(jump_forward=False))
    expected = [plain.chat(c, p)[0].outputs[0].token_ids for c, p in zip(chats, params)]
    steps = plain.engine.num_computed_tokens
    for config in (EngineConfig(), EngineConfig(speculative="ngram")):
        llm = LLM(gguf_model, engine_config=config)
        alone = [llm.chat(c, p)[0].outputs[0] for c, p in zip(chats, params)]
        assert [o.token_ids for o in alone] == expected
        stats = llm.engine.speculator.stats
        assert stats.num_forced_accepted_tokens > 20, stats
        for o in alone:
            jsonschema.validate(json.loads(o.text), PROFILE)
        prompts = [llm.tokenizer.encode_chat(c) for c in chats]
        batched = llm.generate(prompts, params)  # all three in one batch
        assert [o.outputs[0].token_ids for o in batched] == expected
    assert steps > 0


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
              "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get", "parameters": {
              "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}]
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TAGGED = '<tool_call>\n{"name": "get", "arguments": {"n": 1}}\n</tool_call>'
AUTO_CASES = [
    # (reply, allowed with parallel calls, allowed with one call at most)
    ("Hello there.", True, True),
    ("", True, True),
    ("Sure! " + CALL, True, True),  # a bare object later in the text is free: the parser keeps it as text
    ('Example: {"name": "get_weather", "arguments": {"city": 5}}', True, True),
    ('{"name": "Bob", "age": 3}', True, True),  # not a declared tool's name: free
    ('{"name": "getaway"}', True, True),
    ('{"a": 1}', True, True),
    ("<b>bold</b>", True, True),
    (CALL, True, True),
    ("\n " + CALL, True, True),
    ('{"name": "get", "arguments": {"n": 2}}\n' + CALL, True, False),  # two bare calls, one per line
    (CALL + "\nDone: {\"name\": \"x\"}", True, False),
    ("Let me see.\n" + TAGGED + "\nok", True, False),
    (TAGGED, True, True),
    ('<think>\n{"name": "get", "arguments": "x"}\n</think>\n\n' + CALL, True, True),
    ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```', True, True),
    ('{\n  "name": "get",\n  "arguments": {"n": 3}\n}', True, True),
    ('```json\n{"name": "get", "arguments": {"n": 1}}\n```\n```json\n{"name": "get", "arguments": {"n": 2}}\n```', True, False),
    ("```python\nprint(1)\n```", True, True),
    ('```json\n{"name": "Bob"}\n```', True, True),
    # A bare call of a declared tool at the start must be a valid call.
    ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": 5\n  }\n}\n```', False, False),
    ('```json\n{"name": "get", "arguments": {"n": 1}}', False, False),  # the fence must be closed
    ('{"name": "get_weather", "arguments": {"city": 5}}', False, False),
    ('{"name": "get_weather"}', False, False),
    ('{"name": "get_weather", "city": "Paris"}', False, False),
    ('{"name":"get_weather","arguments":{"city":"Paris"}}', False, False),  # the compact opening is held to the spaced one
    ('{"name": "get", "arguments": {"n": 2}}\n{"name": "get_weather", "arguments": {"town": "Paris"}}', False, False),
    ('<tool_call>\n{"name": "nope", "arguments": {"n": 1}}\n</tool_call>', False, False),
    ('<think>\nhmm\n</think>\n\n{"name": "get", "arguments": {"n": "a"}}', False, False),
    ("<tool_call", False, False),  # cannot stop inside an opening
]


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_tool_grammar_engages_only_on_a_call(tokenizer, parallel):
    """tool_choice "auto": checked by feeding whole replies to the compiled grammar; replies the
    grammar allows that start with a bare call also parse as calls with schema-valid arguments."""
    import xgrammar as xgr

    from qwenkit.structured.compiler import compiler_for
    from qwenkit.structured.tools import _bare_openings, tool_call_guidance
    from qwenkit.tokenizer.output_parser import parse_output

    compiled = compiler_for(tokenizer).compile(tool_call_guidance(TOOLS, parallel=parallel))
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for reply, allowed_parallel, allowed_single in AUTO_CASES:
        matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        allowed = matcher.accept_string(reply) and matcher.is_completed() if reply else matcher.is_completed()
        assert allowed == (allowed_parallel if parallel else allowed_single), reply
        parsed = parse_output(reply, tools=schemas)
        if allowed and any(reply.lstrip().startswith(opening) for opening in _bare_openings(TOOLS)):
            assert parsed.tool_calls, reply
        for call in parsed.tool_calls if allowed else []:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_a_schemas_property_order_is_the_outputs(tokenizer):
    """Properties come out in the schema's order, as OpenAI's structured outputs write them (a key
    order lost on the way would force `age` before `name` here)."""
    spec = GuidedDecoding.from_json_schema(PERSON)
    processor = spec(context(tokenizer, spec))
    processor.accept(tokenizer.encode('{"', add_special_tokens=False)[0])
    assert tokenizer.decode(processor.forced_tokens()).startswith("name")
