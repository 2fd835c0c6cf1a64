"""Speculative decoding: exact output (greedy and sampled), KV blocks, preemption, abort, stops."""

from pathlib import Path

import pytest
import torch

from qwenkit.engine import LLM, EngineConfig, SamplingParams
from qwenkit.engine.speculative import (
    ENVELOPE_OBSERVATIONS, PRIOR_TOKEN_COST, Drafter, NgramIndex, SpeculationState, Speculator, StepCosts, best_k,
)
from qwenkit.weights.loader import load_model
from tiny_models import save_tiny

NGRAM = EngineConfig(speculative="ngram")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_spec")
    ref = save_tiny("qwen3", path, max_positions=2048)
    return ref, load_model(str(path))


def repetitive_prompts(n, seed=0):
    """Prompts that repeat a few short phrases: prompt lookup finds matches (right and wrong ones)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        phrases = [torch.randint(0, 290, (4,), generator=g).tolist() for _ in range(3)]
        order = torch.randint(0, 3, (8 + i % 5,), generator=g).tolist()
        out.append([t for j in order for t in phrases[j]])
    return out


def assert_pool_free(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


# ---- the pieces ---------------------------------------------------------------------------------


def test_ngram_index_prefers_long_then_latest_matches():
    index = NgramIndex(1, 3)
    tokens = [1, 2, 3, 9, 1, 2, 3, 8, 5, 2, 3]
    # [2, 3] last occurred before 8; the 3-gram [5, 2, 3] never did.
    assert index.propose(tokens, 3) == [8, 5, 2]
    tokens += [7, 1, 2, 3]  # now the 3-gram [1, 2, 3] matches, latest first: the one before 8
    assert index.propose(tokens, 2) == [8, 5]
    assert NgramIndex(2, 3).propose([4, 5, 6], 4) == []  # nothing repeats
    assert NgramIndex(1, 2).propose([4, 4, 4], 4) == [4]  # a run predicts itself, up to the current end


def test_a_steps_drafts_are_shared_out_by_their_chance_of_being_kept():
    from qwenkit.engine.speculative import allocate_drafts

    flat = lambda n: 1.0  # noqa: E731  (a step costs the same whatever its tokens: every draft pays)
    assert allocate_drafts([0.9, 0.2], [8, 3], 2, flat) == [8, 3]
    per_token = lambda n: float(n)  # noqa: E731  (a token costs a token: no draft short of certain pays)
    assert allocate_drafts([0.9, 0.99], [8, 8], 2, per_token) == [0, 0]
    # In between, the likelier drafts go first; 16 sequences sharing a step draft less than one alone.
    mid = lambda n: 1 + 0.3 * (n - 1)  # noqa: E731
    ks = allocate_drafts([0.95, 0.5], [8, 8], 2, mid)
    assert ks[0] > ks[1]
    alone = allocate_drafts([0.8], [8], 1, lambda n: 1 + 0.1 * (n - 1))
    crowd = allocate_drafts([0.8] * 16, [8] * 16, 16, lambda n: 1 + 0.1 * (n - 1))
    # Alone: 1 + 0.8 + ... + 0.8^6 = 3.95 tokens for 1.6 steps (2.47 per step) beats k = 5 (2.46) and 7 (2.45).
    assert alone == [6] and sum(crowd) < 16 * 6


def test_k_weighs_acceptance_against_measured_step_costs():
    costs = StepCosts()
    assert costs.estimate(5) == 1 + 4 * PRIOR_TOKEN_COST  # nothing timed yet: the prior
    costs.observe(1, 0.010)
    costs.observe(5, 0.030)
    assert costs.estimate(3) == pytest.approx(0.020) and costs.estimate(5) == 0.030  # between two timed sizes: on their line
    assert costs.estimate(7) == 0.030 + 2 * PRIOR_TOKEN_COST * 0.010
    from qwenkit.engine.speculative import allocate_drafts

    noisy = StepCosts()  # 16 sequences on 2 cores: a drafted token costs about a sequence's own one
    for size, ms in ((16, 183), (17, 207), (21, 313), (22, 224)):
        noisy.observe(size, ms / 1000)
    assert noisy.estimate(22, floor_from=16) == 0.313  # never cheaper than a smaller size timed lately
    assert allocate_drafts([0.83] * 16, [4] * 16, 16, lambda n: noisy.estimate(n, floor_from=16)) == [0] * 16  # so no draft pays
    noisy.observe(12, 0.300)  # a slow step below the plain size bounds nothing from it on
    assert noisy.estimate(16, floor_from=16) == 0.183 and noisy.estimate(17, floor_from=16) == 0.207
    for _ in range(ENVELOPE_OBSERVATIONS - 3):
        noisy.observe(16, 0.183)
    assert noisy.estimate(22, floor_from=16) == 0.313  # 21 timed ENVELOPE_OBSERVATIONS - 1 steps ago: still bounds
    noisy.observe(16, 0.183)
    assert noisy.estimate(22, floor_from=16) == 0.224  # and one step later no longer
    cheap = lambda k: 1 + 0.1 * k  # noqa: E731
    dear = lambda k: 1 + 1.0 * k  # noqa: E731
    assert best_k(0.9, 8, cheap) == 8 and best_k(0.9, 8, dear) == 0 and best_k(0.1, 8, cheap) == 0
    assert 1 <= best_k(0.8, 8, lambda k: 1 + 0.4 * k) < 8

    state = SpeculationState(max_k=8)
    assert 1 <= state.choose_k(cheap) < 8  # the prior (2 of 3 kept) is worth a try, not a long one
    for _ in range(20):
        state.record(8, 0)
    assert state.choose_k(cheap) == 0 and state.cooldown > 0  # not worth it: pause...
    pause = state.cooldown
    ks = [state.choose_k(cheap) for _ in range(pause)]
    assert ks == [0] * (pause - 1) + [1]  # ...then retry with one token
    state.record(1, 0)
    state.choose_k(cheap)
    assert state.cooldown == 2 * pause  # each fruitless retry waits longer
    for _ in range(10):
        state.record(8, 8)
    state.cooldown = 0
    assert state.choose_k(cheap) == 8  # copying again: guess far


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed counts against probabilities; bins expecting fewer than 5 are pooled."""
    counts, probs = counts.double(), probs.double() / probs.sum()
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] < 5:  # too little pooled mass to test: fold it into the largest bin
        obs[obs.argmax()] += obs[-1]
        exp[exp.argmax()] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


# ---- exactness ----------------------------------------------------------------------------------


class FreeDrafts(StepCosts):
    """Step costs that never grow with the step's tokens: every draft is worth verifying."""

    def estimate(self, num_tokens: int, floor_from: int = 0) -> float:
        return 1.0


def drafting(llm):
    """`llm` drafting whenever its drafter has guesses, whatever this noisy machine's timings say
    (the tests of exactness need drafts; the cost model has its own tests)."""
    llm.engine.speculator.costs = FreeDrafts()
    return llm


class FixedDrafter(Drafter):
    """Drafts `tokens` after every sequence's first output token (a deterministic guess, as prompt lookup's)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def propose(self, seqs, num_tokens):
        return [self.tokens[:k] if seq.num_output_tokens == 1 else [] for seq, k in zip(seqs, num_tokens)]


def test_sampling_with_speculation_matches_the_target_distribution(tiny):
    """The token at the first drafted position follows the model's distribution, whatever was
    drafted there: chi-square over 2000 seeds against the model's own probabilities."""
    ref, loaded = tiny
    temperature = 0.3  # the first token is nearly always the same, the second spread over ~13
    prompt = torch.randint(0, 290, (12,), generator=torch.Generator().manual_seed(7)).tolist()
    with torch.inference_mode():
        p1 = (ref(torch.tensor([prompt])).logits[0, -1] / temperature).softmax(-1)
        first = int(p1.argmax())
        p2 = (ref(torch.tensor([prompt + [first]])).logits[0, -1] / temperature).softmax(-1)
    draft = int(p2.argmax())
    assert 0.2 < float(p2[draft]) < 0.8  # both acceptance and rejection are common
    llm = LLM(loaded, engine_config=EngineConfig(max_num_seqs=512))
    llm.engine.speculator = Speculator(FixedDrafter([draft, draft]), 2)
    llm.engine.speculator.costs = FreeDrafts()  # every sequence drafts, however many share the step
    params = [SamplingParams(max_tokens=3, temperature=temperature, seed=s, ignore_eos=True) for s in range(2000)]
    outs = llm.generate([prompt] * len(params), params)
    seconds = [o.outputs[0].token_ids[1] for o in outs if o.outputs[0].token_ids[0] == first]
    assert len(seconds) > 500
    counts = torch.bincount(torch.tensor(seconds), minlength=p2.numel())
    assert chi_square_p_value(counts, p2) > 1e-3
    stats = llm.engine.speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_verifications  # kept sometimes, rejected sometimes
    assert_pool_free(llm)


def test_a_seed_samples_the_same_with_or_without_speculation(tiny):
    """Draws of positions after a rejected draft are rewound: a seeded request draws what it would
    have drawn decoding plainly, whatever k the (timing-dependent) choice made, alone or batched."""
    _, loaded = tiny
    spec = drafting(LLM(loaded, engine_config=EngineConfig(speculative="ngram", prompt_lookup_min=1)))
    plain = LLM(loaded)
    batch = repetitive_prompts(4, seed=1)
    params = SamplingParams(max_tokens=30, temperature=0.3, seed=11, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in spec.generate(batch, params)]
    alone = [spec.generate(ids, params)[0].outputs[0].token_ids for ids in batch]
    assert together == alone == [plain.generate(ids, params)[0].outputs[0].token_ids for ids in batch]
    stats = spec.engine.speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # drafts were kept and rejected


def test_greedy_tiny_model_equals_plain_decoding_and_frees_rejected_blocks(tiny):
    _, loaded = tiny
    spec = drafting(LLM(loaded, engine_config=EngineConfig(speculative="ngram", block_size=4)))
    plain = LLM(loaded, engine_config=EngineConfig(block_size=4))
    batch = repetitive_prompts(6)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine = spec.engine
    ids = [engine.add_request(p, params) for p in batch]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
        for seq in engine.scheduler.running:  # no block kept for a rejected draft
            assert len(seq.block_table) <= engine.block_manager.blocks_needed(len(seq))
    for request_id, prompt in zip(ids, batch):
        assert done[request_id].outputs[0].token_ids == plain.generate(prompt, params)[0].outputs[0].token_ids
    stats = engine.speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # drafts were kept and rejected
    assert_pool_free(spec)


def test_n_samples_speculate_each_on_its_own(tiny):
    _, loaded = tiny
    spec, plain = drafting(LLM(loaded, engine_config=EngineConfig(speculative="ngram", prompt_lookup_min=1))), LLM(loaded)
    ids = repetitive_prompts(1, seed=6)[0]
    greedy = SamplingParams(n=3, max_tokens=30, temperature=0, ignore_eos=True)
    want = plain.generate(ids, greedy.with_changes(n=1))[0].outputs[0].token_ids
    assert [o.token_ids for o in spec.generate(ids, greedy)[0].outputs] == [want] * 3
    sampled = SamplingParams(n=3, max_tokens=30, temperature=0.3, seed=5, ignore_eos=True)
    first, again = (spec.generate(ids, sampled)[0] for _ in range(2))
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert spec.engine.speculator.stats.num_accepted_tokens > 0
    assert_pool_free(spec)


def test_preemption_and_abort_with_speculation(tiny):
    _, loaded = tiny
    per_token = 2 * 3 * 2 * 24 * 4  # layers * kv heads * head_dim * fp32, for K and V
    small = drafting(LLM(loaded, engine_config=EngineConfig(kv_cache_memory=per_token * 16 * 12, block_size=16, speculative="ngram")))
    batch = repetitive_prompts(6, seed=2)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = small.generate(batch, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.speculator.stats.num_accepted_tokens > 0
    plain = LLM(loaded)
    for ids, out in zip(batch, outs):
        assert out.outputs[0].token_ids == plain.generate(ids, params)[0].outputs[0].token_ids
    assert_pool_free(small)

    engine = small.engine
    keep = engine.add_request(batch[0], params)
    drop = engine.add_request(batch[1], params)
    drafted = engine.speculator.stats.num_draft_tokens
    while engine.speculator.stats.num_draft_tokens == drafted:  # until a step has verified drafts
        engine.step()
    assert engine.abort_request(drop).outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        engine.step()
    assert keep not in engine.requests
    assert_pool_free(small)


def test_opt_out_and_logits_processors_decode_one_token_at_a_time(tiny):
    _, loaded = tiny
    llm = drafting(LLM(loaded, engine_config=NGRAM))
    batch = repetitive_prompts(2, seed=3)
    llm.generate(batch, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, speculative=False))
    llm.generate(batch, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, thinking_budget=5))
    assert llm.engine.speculator.stats.num_verifications == 0
    llm.generate(batch, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert llm.engine.speculator.stats.num_verifications > 0


# ---- the real model -----------------------------------------------------------------------------


def code_edit_prompts(tokenizer):
    sources = ["qwenkit/engine/text_output.py", "qwenkit/engine/outputs.py"]
    asks = ["Add a docstring to every method of this file that lacks one and return the whole file.",
            "Rename the variable `delta` to `new_text` everywhere in this file and return the whole file."]
    return [
        tokenizer.encode_chat([{"role": "user", "content": f"{ask}\n```python\n{(ROOT / src).read_text()}```"}])
        for ask, src in zip(asks, sources)
    ]


@pytest.fixture(scope="module")
def real(gguf_model):
    """The default model with and without speculation, and the plain greedy outputs of code edits."""
    plain, spec = LLM(gguf_model), LLM(gguf_model, engine_config=NGRAM)
    batch = code_edit_prompts(plain.tokenizer)
    params = SamplingParams(max_tokens=48, temperature=0, logprobs=2)
    return plain, spec, batch, params, [plain.generate(ids, params)[0] for ids in batch]


def test_greedy_real_model_is_token_identical_with_prompt_lookup(real):
    plain, spec, batch, params, expected = real
    for ids, want in zip(batch, expected):  # batch 1: every number is the same, logprobs included
        a, b = want.outputs[0], spec.generate(ids, params)[0].outputs[0]
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
        assert [(lp.token_id, lp.logprob, lp.top) for lp in b.logprobs] == [(lp.token_id, lp.logprob, lp.top) for lp in a.logprobs]
    stats = spec.engine.speculator.stats
    assert stats.mean_accepted_length > 2  # the edits copy their input: most steps emit several tokens
    # Together, a decode's rows share matmuls with the other's prefill chunk, whose size picks the
    # GGUF kernel or the dense path (a batch-composition effect plain decoding has too), so only
    # the tokens are compared.
    together = spec.generate(batch, params)
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in expected]
    assert_pool_free(spec)


def test_stop_strings_inside_an_accepted_run(real):
    plain, spec, batch, params, expected = real
    text = expected[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 4]  # mid-output: inside a copied span
    params = params.with_changes(stop=(stop,), logprobs=None)
    want = plain.generate(batch[0], params)[0].outputs[0]
    have = spec.generate(batch[0], params)[0].outputs[0]
    assert want.finish_reason == "stop" and want.stop_reason == stop
    assert (have.text, have.token_ids, have.finish_reason, have.stop_reason) == (want.text, want.token_ids, "stop", stop)
    assert_pool_free(spec)


# ---- controls -----------------------------------------------------------------------------------


def test_cli_flags_reach_the_engine_config():
    from qwenkit.cli.common import engine_config
    from qwenkit.cli.main import build_parser

    for command in (["serve"], ["generate", "hi"], ["bench"]):
        args = build_parser().parse_args([*command, "--speculative", "ngram", "--num-speculative-tokens", "5"])
        config = engine_config(args)
        assert (config.speculative, config.num_speculative_tokens) == ("ngram", 5)
    assert engine_config(build_parser().parse_args(["bench"])).speculative is None
    assert engine_config(build_parser().parse_args(["serve"])).jump_forward
    assert not engine_config(build_parser().parse_args(["serve", "--no-jump-forward"])).jump_forward


def test_metrics_and_bench_report_acceptance(tiny):
    from prometheus_client import generate_latest

    from qwenkit.engine.benchmark import run_concurrent
    from qwenkit.engine.llm import EngineStats
    from qwenkit.engine.speculative import SpeculationStats
    from qwenkit.server.metrics import ServerMetrics

    text = generate_latest(ServerMetrics(lambda: EngineStats(speculation=SpeculationStats(4, 10, 7))).registry).decode()
    assert "qwenkit_spec_decode_draft_acceptance_rate 0.7" in text
    assert "qwenkit_spec_decode_mean_accepted_length 2.75" in text
    assert "qwenkit_spec_decode_num_draft_tokens 10.0" in text
    plain = generate_latest(ServerMetrics(lambda: EngineStats()).registry).decode()
    assert "qwenkit_spec_decode_draft_acceptance_rate 0.0" in plain

    _, loaded = tiny
    llm = drafting(LLM(loaded, engine_config=NGRAM))
    result = run_concurrent(llm.engine, repetitive_prompts(3, seed=4), 24)
    assert result.speculation is not None and result.speculation.num_draft_tokens > 0
    assert "speculation" in result.report() and "tokens per verification" in result.report()


# ---- draft model --------------------------------------------------------------------------------


def test_a_model_drafting_for_itself_is_always_right(tiny, tmp_path_factory):
    ref, loaded = tiny
    path = tmp_path_factory.mktemp("tiny_draft")
    ref.save_pretrained(path)  # the same weights as `loaded`, loaded again as the draft model
    from tiny_models import tiny_tokenizer

    tiny_tokenizer().save_pretrained(path)
    spec = drafting(LLM(loaded, engine_config=EngineConfig(speculative=f"draft:{path}", num_speculative_tokens=4, block_size=4)))
    plain = LLM(loaded)
    batch = repetitive_prompts(3, seed=5) + [torch.randint(0, 290, (30,), generator=torch.Generator().manual_seed(1)).tolist()]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    outs = spec.generate(batch, params)
    for ids, out in zip(batch, outs):
        assert out.outputs[0].token_ids == plain.generate(ids, params)[0].outputs[0].token_ids
    stats = spec.engine.speculator.stats
    assert stats.num_draft_tokens > 50 and stats.acceptance_rate == 1.0
    seeded = SamplingParams(max_tokens=30, temperature=0.8, seed=3, ignore_eos=True)
    sampled = spec.generate(batch, seeded)
    # Sampling: the draft model's argmax is a point-mass proposal, kept iff the target samples it;
    # the rejected positions' draws are rewound, so a seed gives plain decoding's tokens.
    assert [o.outputs[0].token_ids for o in sampled] == [o.outputs[0].token_ids for o in plain.generate(batch, seeded)]
    assert spec.engine.speculator.stats.acceptance_rate < 1.0  # some guesses were wrong at temperature 0.8
    assert_pool_free(spec)
    drafter = spec.engine.speculator.drafter.block_manager
    assert drafter.num_free_blocks == drafter.num_blocks  # the draft model's cache, too


def test_the_default_model_drafting_for_itself(real):
    """The embedded GGUF as its own draft model: every guess is right, the output is plain decoding's."""
    from qwenkit.weights.default_model import ensure_assembled

    plain, _, batch, params, expected = real
    spec = LLM(plain.engine.loaded, engine_config=EngineConfig(speculative=f"draft:{ensure_assembled()}", num_speculative_tokens=4))
    params = params.with_changes(max_tokens=24, logprobs=None)
    out = spec.generate(batch[0], params)[0].outputs[0]
    assert out.token_ids == expected[0].outputs[0].token_ids[:24]
    stats = spec.engine.speculator.stats
    assert stats.num_draft_tokens >= 8 and stats.acceptance_rate == 1.0
    assert_pool_free(spec)
