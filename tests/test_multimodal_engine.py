"""Multimodal requests through the engine: LLM(path) on tiny random Qwen2-VL / Qwen2.5-VL / Qwen2-Audio
checkpoints saved by transformers, greedy tokens against transformers' generate on the same inputs,
batching with text requests, the encoder and prefix caches, chunked prefill, preemption."""

import base64
import io
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from qwenkit.engine import LLM, EngineConfig, SamplingParams
from qwenkit.engine.media_chat import MediaContext, load_part
from qwenkit.engine.media_inputs import MediaItem, accepted_kinds
from qwenkit.errors import QwenkitError
from qwenkit.multimodal.processor import MediaOptions
from qwenkit.weights.loader import load_model
from tiny_models import save_tiny
from tiny_multimodal import AUDIO, IMAGE, VIDEO, save_tiny_multimodal_checkpoint

STEPS = 8
GREEDY = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)
RNG = np.random.default_rng(7)


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_bytes(seconds: float, seed: int = 0, rate: int = 16000) -> bytes:
    samples = (0.3 * np.random.default_rng(seed).standard_normal(int(rate * seconds))).clip(-1, 1)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def audio_part(seconds: float, seed: int = 0) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(seconds, seed)).decode(), "format": "wav"}}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def img_part(img: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": png_url(img)}}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def vl(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = save_tiny_multimodal_checkpoint(request.param, path)
    return request.param, ref, load_model(str(path))


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_audio")
    ref = save_tiny_multimodal_checkpoint("qwen2_audio", path)
    return ref, load_model(str(path))


def media_of(loaded, messages, options: dict | None = None) -> list[MediaItem]:
    """The preprocessed media of a conversation, as LLM.chat makes them (for the reference's inputs)."""
    ctx = MediaContext(loaded.processor, accepted_kinds(loaded.config), options=MediaOptions.from_dict(options))
    return [load_part(p, ctx) for m in messages for p in m["content"] if p["type"] != "text"]


def reference_generate(ref, prompt_ids: list[int], items: list[MediaItem], steps: int = STEPS) -> list[int]:
    """transformers' greedy generate on the same prompt ids and the same preprocessed media."""
    ids = torch.tensor([prompt_ids])
    kwargs = {}
    images = [i.data for i in items if i.kind == "image"]
    videos = [i.data for i in items if i.kind == "video"]
    audios = [i.data for i in items if i.kind == "audio"]
    if images or videos:
        kwargs["mm_token_type_ids"] = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    if images:
        kwargs.update(pixel_values=torch.cat([i.pixel_values for i in images]), image_grid_thw=torch.tensor([i.grid for i in images]))
    if videos:
        kwargs.update(pixel_values_videos=torch.cat([v.pixel_values for v in videos]), video_grid_thw=torch.tensor([v.grid for v in videos]))
        if ref.config.model_type == "qwen2_5_vl":
            kwargs["second_per_grid_ts"] = torch.tensor([v.seconds_per_grid for v in videos])
    if audios:
        mask = torch.zeros(len(audios), 3000, dtype=torch.long)
        for k, a in enumerate(audios):
            mask[k, : a.num_frames] = 1
        kwargs.update(input_features=torch.stack([a.features for a in audios]), feature_attention_mask=mask)
    with torch.inference_mode():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                           pad_token_id=0, eos_token_id=None, **kwargs)
    return out[0, len(prompt_ids):].tolist()


VL_CASES = {
    "one-image": lambda: user(img_part(image(100, 70)), text("what is this")),
    "two-images": lambda: user(text("compare"), img_part(image(60, 200, 1)), text(" and "), img_part(image(150, 150, 2))),
    "video": lambda: user({"type": "video", "video": [png_url(image(140, 112, s)) for s in range(4)]}, text("what happens")),
}


@pytest.mark.parametrize("case", list(VL_CASES))
def test_vl_greedy_equals_transformers_generate(vl, case):
    _, ref, loaded = vl
    messages = VL_CASES[case]()
    options = {"max_pixels": 28 * 28 * 20, "fps": 1.0} if case == "video" else None  # per request, as a server client may
    out = LLM(loaded).chat(messages, GREEDY, mm_processor_kwargs=options)[0]
    items = media_of(loaded, messages, options)
    assert out.prompt_token_ids.count(VIDEO if case == "video" else IMAGE) == sum(i.num_tokens for i in items)
    assert out.outputs[0].token_ids == reference_generate(ref, out.prompt_token_ids, items)


@pytest.mark.parametrize("seconds", [0.8, 3.0])
def test_audio_greedy_equals_transformers_generate(audio, seconds):
    ref, loaded = audio
    messages = user(audio_part(seconds), text("what is said"))
    out = LLM(loaded).chat(messages, GREEDY)[0]
    items = media_of(loaded, messages)
    assert out.prompt_token_ids.count(AUDIO) == items[0].num_tokens
    assert out.outputs[0].token_ids == reference_generate(ref, out.prompt_token_ids, items)


def test_vl_batch_mixing_text_and_images_equals_each_alone(vl):
    """Text-only, one image, two images and the first image again, all in one batch (prefill chunked
    by a small token budget), give each request's solo greedy tokens."""
    _, _, loaded = vl
    conversations = [
        [{"role": "user", "content": "just text, no media at all"}],
        user(img_part(image(100, 70)), text("describe")),
        user(img_part(image(60, 200, 1)), img_part(image(150, 150, 2)), text("two")),
        user(img_part(image(100, 70)), text("describe again")),
    ]
    together = LLM(loaded, engine_config=EngineConfig(max_num_batched_tokens=48, block_size=4)).chat(conversations, GREEDY)
    for messages, out in zip(conversations, together):
        alone = LLM(loaded).chat(messages, GREEDY)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids


def test_audio_batch_mixing_text_and_audio_equals_each_alone(audio):
    _, loaded = audio
    conversations = [
        [{"role": "user", "content": "hello there"}],
        user(audio_part(1.0, 1), text("transcribe")),
        user(text("two clips"), audio_part(0.5, 2), audio_part(2.0, 3)),
    ]
    together = LLM(loaded, engine_config=EngineConfig(max_num_batched_tokens=32)).chat(conversations, GREEDY)
    for messages, out in zip(conversations, together):
        assert out.outputs[0].token_ids == LLM(loaded).chat(messages, GREEDY)[0].outputs[0].token_ids


def test_same_image_hits_encoder_and_prefix_cache_different_image_shares_nothing(vl):
    _, _, loaded = vl
    llm = LLM(loaded, engine_config=EngineConfig(block_size=4))
    encoder, blocks = llm.engine.encoder_cache.stats, llm.engine.block_manager.stats
    first = llm.chat(user(img_part(image(100, 70)), text("describe")), GREEDY)[0]
    assert (encoder.misses, encoder.hits) == (1, 0)
    start = first.prompt_token_ids.index(IMAGE)
    end = len(first.prompt_token_ids) - first.prompt_token_ids[::-1].index(IMAGE)
    # The same image again (re-encoded as a new PNG): no encoding, and its blocks come from the prefix cache.
    again = llm.chat(user(img_part(image(100, 70)), text("describe")), GREEDY)[0]
    assert (encoder.misses, encoder.hits) == (1, 0)  # every block but the last came from the prefix cache
    assert again.metrics.num_cached_tokens >= end - end % 4
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    # Same size, different pixels: the same token ids, but no block from the image on is shared.
    other = llm.chat(user(img_part(image(100, 70, seed=5)), text("describe")), GREEDY)[0]
    assert other.prompt_token_ids == first.prompt_token_ids
    assert encoder.misses == 2
    assert other.metrics.num_cached_tokens <= start - start % 4
    fresh = LLM(loaded).chat(user(img_part(image(100, 70, seed=5)), text("describe")), GREEDY)[0]
    assert other.outputs[0].token_ids == fresh.outputs[0].token_ids
    # The same image in a different conversation: its encoder output is reused (no prefix in common).
    llm.chat(user(text("a longer question first"), img_part(image(100, 70))), GREEDY)
    assert encoder.misses == 2 and encoder.hits == 1


def test_chunked_prefill_through_an_image_equals_unchunked(vl):
    _, ref, loaded = vl
    messages = user(text("look"), img_part(image(60, 200, 1)), img_part(image(150, 150, 2)), text("now"))
    whole = LLM(loaded).chat(messages, GREEDY)[0]
    for budget in (5, 13):  # chunks end inside the images' placeholder runs
        chunked = LLM(loaded, engine_config=EngineConfig(max_num_batched_tokens=budget, block_size=4)).chat(messages, GREEDY)[0]
        assert chunked.outputs[0].token_ids == whole.outputs[0].token_ids
    assert whole.outputs[0].token_ids == reference_generate(ref, whole.prompt_token_ids, media_of(loaded, messages))


def test_preemption_recomputes_media_requests(vl):
    """A pool too small for every request at once: sequences are preempted and recomputed (prompt
    media and the tokens they generated, at their M-RoPE positions) and still give their solo output."""
    _, _, loaded = vl
    cfg = loaded.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    conversations = [user(img_part(image(100 + 20 * k, 70, k)), text(f"request {k}")) for k in range(4)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    small = LLM(loaded, engine_config=EngineConfig(kv_cache_memory=per_token * 4 * 48, block_size=4))
    outs = small.chat(conversations, params)
    assert small.engine.scheduler.num_preemptions > 0
    for messages, out in zip(conversations, outs):
        assert out.outputs[0].token_ids == LLM(loaded).chat(messages, params)[0].outputs[0].token_ids


def test_generated_placeholder_tokens_are_text(vl):
    """A placeholder token the model generates is embedded as a token, not taken for media."""
    _, _, loaded = vl
    params = SamplingParams(max_tokens=4, temperature=0, logit_bias={IMAGE: 100.0})
    out = LLM(loaded, engine_config=EngineConfig(block_size=4)).chat(user(img_part(image(100, 70)), text("x")), params)[0]
    assert out.outputs[0].token_ids == [IMAGE] * 4 and out.error is None


def test_n_samples_share_the_image(vl):
    _, _, loaded = vl
    llm = LLM(loaded, engine_config=EngineConfig(block_size=4))
    out = llm.chat(user(img_part(image(100, 70)), text("x")), SamplingParams(max_tokens=6, temperature=0, n=2, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == LLM(loaded).chat(user(img_part(image(100, 70)), text("x")), GREEDY.with_changes(max_tokens=6))[0].outputs[0].token_ids


def test_media_errors(vl, audio, tmp_path):
    _, _, loaded = vl
    llm = LLM(loaded)
    with pytest.raises(QwenkitError, match="does not take audio"):
        llm.chat(user(audio_part(1.0)), GREEDY)
    with pytest.raises(QwenkitError, match="cannot decode the image"):
        llm.chat(user({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}), GREEDY)
    with pytest.raises(QwenkitError, match="more placeholder"):
        llm.generate([1, 2, IMAGE, 3], GREEDY)  # a placeholder without its image
    save_tiny("qwen2", tmp_path)
    with pytest.raises(QwenkitError, match="text-only"):
        LLM(str(tmp_path)).chat(user(img_part(image(30, 30))), GREEDY)
    _, audio_loaded = audio
    with pytest.raises(QwenkitError, match="does not take images"):
        LLM(audio_loaded).chat(user(img_part(image(30, 30))), GREEDY)


def test_media_sources_follow_the_policy(tmp_path):
    from qwenkit.multimodal.sources import MediaPolicy, load_media_bytes

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.bin").write_bytes(b"abc")
    (tmp_path / "secret").write_bytes(b"no")
    (allowed / "link").symlink_to(tmp_path / "secret")
    policy = MediaPolicy(allowed_local_path=allowed, max_bytes=10)
    assert load_media_bytes((allowed / "a.bin").as_uri(), policy) == b"abc"
    assert load_media_bytes(str(allowed / "a.bin"), policy) == b"abc"
    for escape in (str(allowed / ".." / "secret"), (allowed / "link").as_uri()):  # neither .. nor a symlink leaves the root
        with pytest.raises(QwenkitError, match="must lie under"):
            load_media_bytes(escape, policy)
    with pytest.raises(QwenkitError, match="not allowed"):
        load_media_bytes(str(allowed / "a.bin"), MediaPolicy())
    with pytest.raises(QwenkitError, match="off on this server"):
        load_media_bytes("https://example.com/x.png", MediaPolicy())
    with pytest.raises(QwenkitError, match="not allowed"):
        load_media_bytes("https://evil.example.org/x.png", MediaPolicy(allowed_domains=("example.com",)))
    with pytest.raises(QwenkitError, match="larger than 10 bytes"):
        load_media_bytes("data:application/octet-stream;base64," + base64.b64encode(b"x" * 40).decode(), policy)
    with pytest.raises(QwenkitError, match="scheme"):
        load_media_bytes("ftp://example.com/x.png", policy)
    assert load_media_bytes("data:text/plain,hi%20there", policy) == b"hi there"


def test_async_chat_with_an_image_equals_llm_chat(vl):
    import asyncio

    from qwenkit.engine import AsyncLLM

    _, _, loaded = vl
    messages = user(img_part(image(100, 70)), text("describe"))
    allm = AsyncLLM(loaded)
    try:
        async def run():
            last = None
            async for out in allm.chat(messages, GREEDY):
                last = out
            return last

        out = asyncio.run(run())
    finally:
        allm.shutdown()
    assert out.outputs[0].token_ids == LLM(loaded).chat(messages, GREEDY)[0].outputs[0].token_ids
