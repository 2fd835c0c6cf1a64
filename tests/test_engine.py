"""The engine: continuous batching, prefix caching, preemption, abort, n, thinking budget, async API."""

import asyncio

import pytest
import torch
from transformers import AutoTokenizer

from qwenkit.engine import LLM, AsyncLLM, EngineConfig, SamplingParams
from qwenkit.engine.logits_process import LogitsProcessor
from qwenkit.errors import QwenkitError
from qwenkit.weights.loader import load_model
from tiny_models import save_tiny

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    ref = save_tiny("qwen3", path, max_positions=2048)
    return path, ref, load_model(str(path))


def prompts(n, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 290, (length + i % 7,), generator=g).tolist() for i in range(n)]


def assert_pool_free(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_greedy_matches_transformers_generate(tiny):
    path, ref, loaded = tiny
    llm = LLM(loaded)
    for ids in prompts(3):
        with torch.inference_mode():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert llm.generate(ids, GREEDY.with_changes(ignore_eos=True))[0].outputs[0].token_ids == out[0, len(ids):].tolist()


def test_batch_equals_alone_with_chunked_prefill(tiny):
    """16 prompts together (prefill chunked by a small token budget) give each one's solo output."""
    _, _, loaded = tiny
    together = LLM(loaded, engine_config=EngineConfig(max_num_batched_tokens=64))
    batch = prompts(16, length=40)
    outs = together.generate(batch, GREEDY)
    solo = LLM(loaded)
    for ids, out in zip(batch, outs):
        assert out.outputs[0].token_ids == solo.generate(ids, GREEDY)[0].outputs[0].token_ids
    assert_pool_free(together)


def test_prefix_cache_computes_only_new_tokens(tiny):
    _, _, loaded = tiny
    llm = LLM(loaded)
    prefix = prompts(1, length=512, seed=1)[0][:512]
    first = llm.generate(prefix + [7, 8, 9], GREEDY)[0]
    assert first.metrics.num_cached_tokens == 0
    before = llm.engine.num_computed_tokens
    second_prompt = prefix + [11, 12, 13, 14, 15]
    second = llm.generate(second_prompt, GREEDY)[0]
    assert second.metrics.num_cached_tokens == 512
    # Only the 5 new prompt tokens and the 11 decoded ones (the last output token is never fed back) ran.
    assert llm.engine.num_computed_tokens - before == 5 + 11
    uncached = LLM(loaded, engine_config=EngineConfig(enable_prefix_caching=False))
    assert second.outputs[0].token_ids == uncached.generate(second_prompt, GREEDY)[0].outputs[0].token_ids
    assert llm.engine.block_manager.stats.hit_tokens == 512
    assert_pool_free(llm)


def test_preemption_when_pool_is_too_small(tiny):
    _, _, loaded = tiny
    per_token = 2 * 3 * 2 * 24 * 4  # layers * kv heads * head_dim * fp32, for K and V
    small = LLM(loaded, engine_config=EngineConfig(kv_cache_memory=per_token * 16 * 12, block_size=16))
    assert small.engine.block_manager.num_blocks == 12
    batch = prompts(6, length=20, seed=2)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = small.generate(batch, params)
    assert small.engine.scheduler.num_preemptions > 0
    roomy = LLM(loaded)
    for ids, out in zip(batch, outs):
        assert out.outputs[0].token_ids == roomy.generate(ids, params)[0].outputs[0].token_ids
    assert_pool_free(small)


def test_request_too_large_for_pool_is_refused(tiny):
    _, _, loaded = tiny
    small = LLM(loaded, engine_config=EngineConfig(kv_cache_memory=576 * 16 * 4, block_size=16))
    with pytest.raises(QwenkitError, match="exceeds the KV cache"):
        small.generate(prompts(1, length=100)[0], SamplingParams(max_tokens=50))


def test_prompt_longer_than_context_names_both_numbers(tiny):
    _, _, loaded = tiny
    with pytest.raises(QwenkitError, match="3000 tokens; the model's context holds 2048"):
        LLM(loaded).generate([5] * 3000, GREEDY)


def test_abort_frees_blocks(tiny):
    _, _, loaded = tiny
    llm = LLM(loaded)
    engine = llm.engine
    keep = engine.add_request(prompts(1, seed=3)[0], SamplingParams(max_tokens=30, temperature=0))
    drop = engine.add_request(prompts(1, length=60, seed=4)[0], SamplingParams(max_tokens=30, temperature=0))
    for _ in range(3):
        engine.step()
    held = engine.block_manager.num_free_blocks
    out = engine.abort_request(drop)
    assert out.outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_free_blocks > held
    while engine.has_unfinished_requests():
        engine.step()
    assert keep not in engine.requests
    assert_pool_free(llm)


def test_n_samples_share_the_prompt(tiny):
    _, _, loaded = tiny
    llm = LLM(loaded)
    ids = prompts(1, seed=5)[0]
    out = llm.generate(ids, SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=3, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different samples
    greedy = llm.generate(ids, SamplingParams(n=2, max_tokens=10, temperature=0))[0]
    single = llm.generate(ids, SamplingParams(max_tokens=10, temperature=0))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == single.outputs[0].token_ids
    assert_pool_free(llm)


def test_thinking_budget_closes_the_reasoning(tiny):
    path, _, loaded = tiny
    llm = LLM(loaded)
    tok = AutoTokenizer.from_pretrained(path)
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    params = SamplingParams(max_tokens=20, temperature=0, thinking_budget=5, ignore_eos=True)
    out = llm.generate(prompt, params)[0].outputs[0]
    forced = tok("\n</think>\n\n", add_special_tokens=False)["input_ids"]
    assert out.token_ids[5 : 5 + len(forced)] == forced
    assert "</think>" not in "".join(tok.decode(out.token_ids[:5]))
    assert out.reasoning_content == tok.decode(out.token_ids[:5]).strip("\n")
    assert out.content == tok.decode(out.token_ids[5 + len(forced):])


@pytest.fixture
def async_llm(tiny):
    llm = AsyncLLM(tiny[2])
    yield llm
    llm.shutdown()


def test_async_streams_and_abort(tiny, async_llm):
    _, _, loaded = tiny
    llm = async_llm

    async def collect(ids, params, request_id, started=None):
        chunks = []
        async for out in llm.generate(ids, params, request_id):
            chunks.append(out)
            if started is not None:
                started.set()
        return chunks

    async def main():
        batch = prompts(4, seed=6)
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        tasks = [asyncio.create_task(collect(ids, GREEDY, f"r{i}")) for i, ids in enumerate(batch)]
        started = asyncio.Event()
        victim = asyncio.create_task(collect(batch[0], long, "victim", started))
        await started.wait()  # abort mid-stream, however fast the engine is
        llm.abort("victim")
        results = await asyncio.gather(*tasks)
        aborted = await victim
        return batch, results, aborted

    batch, results, aborted = asyncio.run(main())
    sync = LLM(loaded)
    for ids, chunks in zip(batch, results):
        final = chunks[-1].outputs[0]
        assert final.token_ids == sync.generate(ids, GREEDY)[0].outputs[0].token_ids
        assert "".join(c.outputs[0].delta_text for c in chunks) == final.text
        assert chunks[-1].metrics.time_to_first_token > 0
    assert aborted[-1].outputs[0].finish_reason == "abort"
    assert len(aborted[-1].outputs[0].token_ids) < 200
    assert_pool_free(llm)


def test_cancelled_consumer_frees_its_request(async_llm):
    """A consumer that stops iterating (a client disconnect) aborts its request."""
    llm = async_llm

    async def main():
        gen = llm.generate(prompts(1, seed=8)[0], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        async for _ in gen:
            break
        await gen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not llm.engine.has_unfinished_requests():
                break

    asyncio.run(main())
    assert not llm.engine.has_unfinished_requests()
    assert_pool_free(llm)


def test_out_of_vocabulary_prompt_ids_are_refused(tiny):
    _, _, loaded = tiny
    with pytest.raises(QwenkitError, match=r"token ids must be in \[0, 300\)"):
        LLM(loaded).generate([1, 2, 300], GREEDY)


class BanTokens(LogitsProcessor):
    """A user's logits processor: these tokens never come out."""

    calls = 0

    def __init__(self, ids):
        self.ids = ids

    @classmethod
    def apply(cls, logits, rows, processors):
        cls.calls += 1
        for row, p in zip(rows, processors):
            logits[row, p.ids] = float("-inf")

    def accept(self, token_id):
        pass


def test_user_logits_processor_equals_transformers_bad_words(tiny):
    path, ref, loaded = tiny
    llm = LLM(loaded)
    batch = prompts(4)
    plain = [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY)]
    banned = sorted({ids[0] for ids in plain} | {ids[1] for ids in plain})
    BanTokens.calls = 0
    params = GREEDY.with_changes(logits_processors=[lambda ctx: BanTokens(banned)])
    outs = llm.generate(batch, params)
    assert BanTokens.calls == GREEDY.max_tokens  # one batched call per step for all four rows
    for ids, out in zip(batch, outs):
        with torch.inference_mode():
            expected = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                    pad_token_id=0, bad_words_ids=[[t] for t in banned])[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == expected
        assert not set(banned) & set(expected)
    assert_pool_free(llm)


class Explodes(LogitsProcessor):
    @classmethod
    def apply(cls, logits, rows, processors):
        raise RuntimeError("this request's own processor is broken")

    def accept(self, token_id):
        pass


def test_a_failing_request_fails_alone(tiny):
    _, _, loaded = tiny
    llm = LLM(loaded)
    good, bad = prompts(2)
    alone = llm.generate(good, GREEDY)[0].outputs[0].token_ids
    outs = llm.generate([good, bad], [GREEDY, GREEDY.with_changes(logits_processors=[lambda ctx: Explodes()])])
    assert outs[0].error is None and outs[0].outputs[0].token_ids == alone
    assert outs[1].finished and outs[1].outputs[0].finish_reason == "error"
    assert "this request's own processor is broken" in outs[1].error
    assert_pool_free(llm)


def test_n_samples_fork_on_a_full_kv_pool(tiny):
    """Samples forked when no block is free wait and recompute their tail instead of failing."""
    _, _, loaded = tiny
    per_token = 2 * 3 * 2 * 24 * 4  # as in test_preemption_when_pool_is_too_small
    llm = LLM(loaded, engine_config=EngineConfig(kv_cache_memory=per_token * 16 * 8, block_size=16))
    ids = prompts(1, length=40)[0]  # 3 blocks; 8 samples of 52 tokens would need 18
    single = llm.generate(ids, GREEDY)[0].outputs[0].token_ids
    out = llm.generate(ids, GREEDY.with_changes(n=8))[0]
    assert [o.token_ids for o in out.outputs] == [single] * 8
    assert_pool_free(llm)


def test_token_ids_and_seeds_outside_their_range_are_refused(tiny):
    _, _, loaded = tiny
    llm = LLM(loaded)
    vocab = loaded.config.vocab_size
    for params in (GREEDY.with_changes(stop_token_ids=(vocab + 5,), min_tokens=2), GREEDY.with_changes(logit_bias={vocab: 1.0})):
        with pytest.raises(QwenkitError, match="outside the vocabulary"):
            llm.generate(prompts(1)[0], params)
    with pytest.raises(QwenkitError, match="seed"):
        SamplingParams(seed=2**64 - 1, n=2)
    with pytest.raises(QwenkitError, match="logit_bias"):
        SamplingParams(logit_bias={5: 101})
    assert_pool_free(llm)
