"""Sampling: each knob checked against its definition or an independent reference."""

import math

import pytest
import torch

from qwenkit.engine import LLM, SamplingParams
from qwenkit.engine.sampler import SamplingRow, apply_penalties, sample, shape_distribution
from qwenkit.errors import QwenkitError
from qwenkit.tokenizer.reasoning import split_reasoning
from test_engine import GREEDY, prompts, tiny  # noqa: F401  (tiny is a fixture)


def row(params, token_ids=(), num_prompt=0, generator=None, blocked=frozenset()):
    return SamplingRow(params, list(token_ids), num_prompt, generator, blocked)


def test_penalties_change_logits_exactly_as_defined():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    # prompt: tokens 0, 1; output: 1, 3, 3
    r = row(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                           logit_bias={4: 1.5}), [0, 1, 1, 3, 3], num_prompt=2)
    got = apply_penalties(logits, [r])[0]
    # by hand: bias first (token 4: -2 + 1.5 = -0.5); repetition on seen {0,1,3}: positive / 2, negative * 2;
    # then output counts {1: 1, 3: 2}: minus 0.25 * count + 0.5 * present.
    expected = torch.tensor([2.0 / 2, -1.0 * 2 - 0.25 - 0.5, 0.5, 3.0 / 2 - 0.5 - 0.5, -0.5])
    assert torch.allclose(got, expected)


def test_min_tokens_blocks_stop_tokens_only_until_reached():
    logits = torch.zeros(1, 6)
    params = SamplingParams(min_tokens=2, max_tokens=5)
    early = apply_penalties(logits, [row(params, [1, 2, 3], num_prompt=2, blocked=frozenset({5}))])[0]
    late = apply_penalties(logits, [row(params, [1, 2, 3, 4], num_prompt=2, blocked=frozenset({5}))])[0]
    assert early[5] == float("-inf") and late[5] == 0


def test_a_batch_mixing_greedy_and_sampled_rows():
    """Greedy rows take their batch's row maxima (the first of ties; a row with a NaN, the largest
    finite logit), a sampled row draws from its own generator as it would alone."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [1.0, 2.0, 0.5, 0.0], [float("nan"), 1.0, 4.0, 2.0], [5.0, 1.0, 1.0, 0.0]])
    seeded = SamplingParams(temperature=1.0, seed=7)
    alone_generator = torch.Generator().manual_seed(7)
    alone, _ = sample(logits[1:2].clone(), [row(seeded, generator=alone_generator)])
    rows = [row(GREEDY), row(seeded, generator=torch.Generator().manual_seed(7)), row(GREEDY), row(GREEDY)]
    tokens, _ = sample(logits, rows)
    assert tokens == [1, alone[0], 2, 0]


def test_top_p_and_min_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda p: (shape_distribution(logits, p) > 0).tolist()  # noqa: E731
    assert kept(SamplingParams(top_p=0.5)) == [True, False, False, False]
    assert kept(SamplingParams(top_p=0.8)) == [True, True, False, False]
    assert kept(SamplingParams(top_p=0.81)) == [True, True, True, False]
    assert kept(SamplingParams(min_p=0.35)) == [True, True, False, False]  # 0.35 * 0.5 = 0.175
    assert kept(SamplingParams(top_k=3)) == [True, True, True, False]


def wilson_hilferty_critical(df: int, z: float = 3.09) -> float:
    """Upper chi-square quantile (z = 3.09: p = 0.001), without scipy."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    stat = (((counts[big] - expected[big]) ** 2) / expected[big]).sum()
    rest_obs, rest_exp = counts[~big].sum(), expected[~big].sum()
    if rest_exp > 0:
        stat += (rest_obs - rest_exp) ** 2 / rest_exp
    return float(stat), int(big.sum())  # bins - 1 degrees of freedom (+1 merged bin - 1)


def test_sampled_frequencies_match_softmax(tiny):
    """Chi-square goodness of fit on the tiny model's next-token distribution at T = 0.7."""
    _, _, loaded = tiny
    ids = torch.tensor(prompts(1, seed=9)[0])
    from qwenkit.model.attention import NoCache

    with torch.inference_mode():
        logits = loaded.model.compute_logits(loaded.model(ids, torch.arange(len(ids)), NoCache(torch.arange(len(ids))))[-1])
    params = SamplingParams(temperature=0.7)
    g = torch.Generator().manual_seed(0)
    draws = 6000
    tokens, _ = sample(logits.expand(draws, -1), [row(params, generator=g)] * draws)
    counts = torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1]).double()
    stat, df = chi_square(counts, torch.softmax(logits.double() / 0.7, -1))
    assert stat < wilson_hilferty_critical(df)
    # The same test rejects the wrong temperature: it has the power to fail.
    wrong, df_wrong = chi_square(counts, torch.softmax(logits.double() / 1.0, -1))
    assert wrong > wilson_hilferty_critical(df_wrong)


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny):
    _, _, loaded = tiny
    llm = LLM(loaded)
    for ids in prompts(3, seed=10):
        greedy = llm.generate(ids, GREEDY)[0].outputs[0].token_ids
        assert llm.generate(ids, SamplingParams(max_tokens=12, temperature=1.0, top_k=1))[0].outputs[0].token_ids == greedy
        assert llm.generate(ids, SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6))[0].outputs[0].token_ids == greedy


def test_seed_gives_same_text_in_any_batch(tiny):
    _, _, loaded = tiny
    llm = LLM(loaded)
    ids = prompts(1, seed=11)[0]
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate(ids, seeded)[0].outputs[0].token_ids
    noisy = SamplingParams(max_tokens=20, temperature=1.3, ignore_eos=True)
    batch = llm.generate([prompts(1, seed=12)[0], ids, prompts(1, seed=13)[0]], [noisy, seeded, noisy])
    assert batch[1].outputs[0].token_ids == alone
    other_seed = llm.generate(ids, seeded.with_changes(seed=99))[0].outputs[0].token_ids
    assert other_seed != alone


def test_logprobs_are_the_models_log_softmax(tiny):
    _, ref, loaded = tiny
    ids = prompts(1, seed=14)[0]
    out = LLM(loaded).generate(ids, SamplingParams(max_tokens=1, temperature=0, logprobs=3))[0].outputs[0]
    with torch.inference_mode():
        expected = torch.log_softmax(ref(torch.tensor([ids])).logits[0, -1], -1)
    lp = out.logprobs[0]
    assert lp.token_id == out.token_ids[0] == int(expected.argmax())
    assert abs(lp.logprob - float(expected.max())) < 1e-4
    top = torch.topk(expected, 3)
    assert [t for t, _ in lp.top] == top.indices.tolist()
    assert max(abs(a - b) for (_, a), b in zip(lp.top, top.values.tolist())) < 1e-4


def test_logit_bias_forces_a_token(tiny):
    _, _, loaded = tiny
    out = LLM(loaded).generate(prompts(1)[0], SamplingParams(max_tokens=4, temperature=0, logit_bias={42: 100}))
    assert out[0].outputs[0].token_ids == [42, 42, 42, 42]


def test_stop_token_ids(tiny):
    _, _, loaded = tiny
    llm = LLM(loaded)
    ids = prompts(1, seed=15)[0]
    free = llm.generate(ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    out = llm.generate(ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=[free[3]]))[0].outputs[0]
    assert out.token_ids == free[: free.index(free[3]) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == free[3]


@pytest.mark.real_model
def test_stop_string_spanning_two_tokens(default_model):
    llm = LLM(default_model)
    messages = [{"role": "user", "content": "Write a haiku about the sea"}]
    free = llm.chat(messages, SamplingParams(max_tokens=16, temperature=0))[0].outputs[0]
    assert free.text.startswith("Whispers of the sea")
    # " of" and " the" are separate tokens: the stop string "of th" starts in one and ends in the next.
    tok = llm.tokenizer
    pieces = [tok.decode([t]) for t in free.token_ids]
    assert " of" in pieces and " the" in pieces
    out = llm.chat(messages, SamplingParams(max_tokens=16, temperature=0, stop=["of th"]))[0].outputs[0]
    assert out.text == "Whispers "
    assert out.finish_reason == "stop" and out.stop_reason == "of th"
    streamed = "".join(o.outputs[0].delta_text for o in llm.stream(
        tok.chat_template.render(messages), SamplingParams(max_tokens=16, temperature=0, stop=["of th"])))
    assert streamed == "Whispers "


def test_generation_config_defaults_and_overrides():
    cfg = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "do_sample": True}
    p = SamplingParams.from_generation_config(cfg, max_tokens=5, top_k=None)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (0.7, 0.8, 20, 1.05, 5)
    assert SamplingParams.from_generation_config({"do_sample": False}).greedy


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(n=0), dict(presence_penalty=3)])
def test_invalid_params_are_refused(bad):
    with pytest.raises(QwenkitError):
        SamplingParams(**bad)


@pytest.mark.parametrize(
    "text, opened, expected",
    [
        ("<think>\nplan\n</think>\n\nanswer", False, ("plan", "answer")),
        ("plan\n</think>\n\nanswer", True, ("plan", "answer")),
        ("just an answer", False, (None, "just an answer")),
        ("<think>\nstill thinking", False, ("still thinking", "")),
        ("<think>\n\n</think>\n\nhi", False, ("", "hi")),
    ],
)
def test_split_reasoning(text, opened, expected):
    assert split_reasoning(text, opened) == expected
