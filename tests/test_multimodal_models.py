"""Qwen2-VL, Qwen2.5-VL and Qwen2-Audio give transformers' logits (fp32, eager) to 1e-4.

Tiny random models are built and saved by transformers, loaded by qwenkit, and fed the same
pixels / mel features; the prompts hold one image, two images of different sizes, a video, or an
audio clip. A second check runs the prompt in two prefill chunks (the first ending inside an
image) and then token by token through the paged KV cache, at M-RoPE positions continuing from
the rope delta, against transformers' logits for the whole sequence.
"""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

from qwenkit.config import ModelConfig
from qwenkit.engine.paged_attention import BatchAttention, PagedKVCache, PrefillSlice, slots_for
from qwenkit.errors import QwenkitError
from qwenkit.model.attention import NoCache
from qwenkit.model.mrope import VisionItem, mrope_positions
from qwenkit.model.qwen2_audio import audio_token_count
from qwenkit.multimodal.audio import log_mel_features
from qwenkit.multimodal.image import preprocess_image
from qwenkit.multimodal.video import PatchedVideo, VideoLimits, preprocess_video
from qwenkit.weights.multimodal import load_multimodal_model
from tiny_models import save_tiny
from tiny_multimodal import AUDIO, IMAGE, VIDEO, VISION_END, VISION_START, audio_config, save_tiny_multimodal, vl_config

TOL = 1e-4
VL_ARCHS = ("qwen2_vl", "qwen2_5_vl")
RNG = np.random.default_rng(0)


def random_image(width: int, height: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))


def media_items(case: str):
    if case == "one-image":
        return [preprocess_image(random_image(100, 70))]
    if case == "two-images":
        return [preprocess_image(random_image(60, 200)), preprocess_image(random_image(150, 150))]
    # 4 frames -> 2 temporal patches of 8x10 patches; a small per-request pixel budget keeps it tiny.
    frames = [random_image(140, 112) for _ in range(4)]
    return [preprocess_video(frames, VideoLimits(min_pixels=56 * 56, max_pixels=28 * 28 * 30))]


def vl_prompt(items) -> list[int]:
    ids = [5, 17, 250]
    for k, item in enumerate(items):
        token = VIDEO if isinstance(item, PatchedVideo) else IMAGE
        ids += [VISION_START] + [token] * item.num_tokens + [VISION_END] + [40 + k, 41 + k]
    return ids + [7, 99, 3, 11]


def reference_vl_logits(ref, arch, ids, items):
    ids_t = torch.tensor(ids)[None]
    images = [i for i in items if not isinstance(i, PatchedVideo)]
    videos = [i for i in items if isinstance(i, PatchedVideo)]
    kwargs = {"mm_token_type_ids": (ids_t == IMAGE).long() + 2 * (ids_t == VIDEO).long()}
    if images:
        kwargs.update(pixel_values=torch.cat([i.pixel_values for i in images]),
                      image_grid_thw=torch.tensor([i.grid for i in images]))
    if videos:
        kwargs.update(pixel_values_videos=torch.cat([v.pixel_values for v in videos]),
                      video_grid_thw=torch.tensor([v.grid for v in videos]))
        if arch == "qwen2_5_vl":
            kwargs["second_per_grid_ts"] = torch.tensor([v.seconds_per_grid for v in videos])
    with torch.inference_mode():
        return ref(input_ids=ids_t, **kwargs).logits[0]


def vision_items(items):
    return [VisionItem(i.grid, isinstance(i, PatchedVideo), getattr(i, "seconds_per_grid", 1.0)) for i in items]


@pytest.fixture(scope="module", params=VL_ARCHS)
def vl_models(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    ref = save_tiny_multimodal(request.param, directory)
    return request.param, ref, load_multimodal_model(directory)


@pytest.mark.parametrize("case", ["one-image", "two-images", "video"])
def test_vl_logits_match_transformers(vl_models, case):
    arch, ref, model = vl_models
    items = media_items(case)
    ids = vl_prompt(items)
    expected = reference_vl_logits(ref, arch, ids, items)
    with torch.inference_mode():
        media = torch.cat(model.encode_vision(torch.cat([i.pixel_values for i in items]), [i.grid for i in items]))
        mrope = mrope_positions(ids, vision_items(items), model.config.vision)
        order = torch.arange(len(ids))
        got = model.compute_logits(model(torch.tensor(ids), mrope.positions, NoCache(order), media=media))
        without_media = model.compute_logits(model(torch.tensor(ids), mrope.positions, NoCache(order)))
        flat = model.compute_logits(model(torch.tensor(ids), order, NoCache(order), media=media))
    assert (got - expected).abs().max().item() < TOL
    assert (without_media - expected).abs().max().item() > 1e-2  # the pixels do reach the logits
    assert (flat - expected).abs().max().item() > 1e-3  # and so do the M-RoPE positions


def run_stepwise(model, ids, positions, media, chunk_end: int, prompt_len: int, block_size: int = 4):
    """Logits of rows chunk_end-1 .. len(ids)-1: prefill [0, chunk_end), [chunk_end, prompt_len), then decode."""
    cfg = model.config
    blocks = -(-len(ids) // block_size)
    cache = PagedKVCache(cfg.num_hidden_layers, blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, torch.float32)
    table = list(range(blocks))[::-1]  # blocks out of order, as a long-running cache hands them out
    is_media = torch.isin(torch.tensor(ids), model.placeholder_ids)
    empty = torch.zeros(0, dtype=torch.long)
    rows, used = [], 0
    steps = [(0, chunk_end), (chunk_end, prompt_len)] + [(p, p + 1) for p in range(prompt_len, len(ids))]
    for start, end in steps:
        slots = slots_for(table, start, end, block_size)
        if end - start > 1 or start < prompt_len:
            attention = BatchAttention(cache, slots, empty, empty[None], empty,
                                       [PrefillSlice(slice(0, end - start), torch.arange(start, end), slots_for(table, 0, end, block_size))])
        else:
            attention = BatchAttention(cache, slots, torch.tensor([0]), slots_for(table, 0, end, block_size)[None], torch.tensor([end]), [])
        count = int(is_media[start:end].sum())
        step_media = media[used : used + count] if count else None
        used += count
        hidden = model(torch.tensor(ids[start:end]), positions[..., start:end], attention, media=step_media)
        rows.append(model.compute_logits(hidden[-1:]))
    return torch.cat(rows)


def test_vl_chunked_prefill_and_decode_through_paged_cache(vl_models):
    arch, ref, model = vl_models
    items = media_items("two-images")
    prompt = vl_prompt(items)
    ids = prompt + [60, 61, 62]  # tokens "generated" after the prompt
    expected = reference_vl_logits(ref, arch, ids, items)
    with torch.inference_mode():
        media = torch.cat(model.encode_vision(torch.cat([i.pixel_values for i in items]), [i.grid for i in items]))
        mrope = mrope_positions(prompt, vision_items(items), model.config.vision)
        positions = torch.cat([mrope.positions, mrope.for_decode(len(prompt), len(ids) - len(prompt))], dim=1)
        chunk_end = 3 + 1 + items[0].num_tokens // 2  # inside the first image
        got = run_stepwise(model, ids, positions, media, chunk_end, len(prompt))
    want = torch.cat([expected[chunk_end - 1 : chunk_end], expected[len(prompt) - 1 :]])
    assert (got - want).abs().max().item() < TOL


@pytest.fixture(scope="module")
def audio_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2_audio")
    ref = save_tiny_multimodal("qwen2_audio", directory)
    return ref, load_multimodal_model(directory)


@pytest.mark.parametrize("seconds", [0.73, 2.5, 30.0])  # 30 s: every frame is audio
def test_audio_logits_match_transformers(audio_models, seconds):
    ref, model = audio_models
    samples = (0.1 * np.random.default_rng(1).standard_normal(int(16000 * seconds))).astype(np.float32)
    extractor = transformers.WhisperFeatureExtractor(feature_size=128)
    inputs = extractor(samples, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    features = log_mel_features(samples)
    n = audio_token_count(features.num_frames)
    ids = torch.tensor([5, 6, 40] + [AUDIO] * n + [41, 7, 8, 9])
    with torch.inference_mode():
        expected = ref(input_ids=ids[None], input_features=inputs["input_features"],
                       feature_attention_mask=inputs["attention_mask"]).logits[0]
        media = model.encode_audio(features.features, features.num_frames)
        positions = torch.arange(len(ids))
        got = model.compute_logits(model(ids, positions, NoCache(positions), media=media))
        stepwise = run_stepwise(model, ids.tolist(), positions, media, 3 + n // 2, len(ids) - 3)
    assert (got - expected).abs().max().item() < TOL
    assert (stepwise - torch.cat([expected[2 + n // 2 : 3 + n // 2], expected[-4:]])).abs().max().item() < TOL


def test_placeholder_count_must_match_media(vl_models):
    _, _, model = vl_models
    item = media_items("one-image")[0]
    ids = vl_prompt([item])
    with pytest.raises(QwenkitError, match="placeholder"):
        mrope_positions(ids[:-8] + ids[-4:], [VisionItem(item.grid)], model.config.vision)  # image tokens cut short
    with pytest.raises(QwenkitError, match="encoder outputs"):
        media = torch.zeros(item.num_tokens - 1, model.config.hidden_size)
        model(torch.tensor(ids), torch.arange(len(ids)), NoCache(torch.arange(len(ids))), media=media)


def test_released_qwen2_vl_config_layout():
    """Released Qwen2-VL configs keep text fields at the top level and say rope_scaling type "mrope"."""
    config = ModelConfig.from_hf_dict({
        "model_type": "qwen2_vl", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": True,
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2},
    })
    assert config.model_type == "qwen2_vl" and config.attention_bias and config.tie_word_embeddings
    assert config.rope.theta == 1e6 and config.rope.rope_type == "default" and config.mrope_section == (16, 24, 24)
    assert config.vision.intermediate_size == 5120 and config.vision.out_hidden_size == 1536


def test_sharded_checkpoint_and_nested_tensor_names(tmp_path):
    """Sharded save_pretrained output, and the same weights under transformers 5's in-memory names
    (model.language_model.*, model.visual.*) as some 4.5x-era checkpoints store them, load alike."""
    ref = save_tiny_multimodal("qwen2_5_vl", tmp_path / "sharded")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    nested = tmp_path / "nested"
    nested.mkdir()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state) and any(k.startswith("model.visual.") for k in state)
    save_file(state, nested / "model.safetensors")
    (nested / "config.json").write_text(json.dumps(json.loads((tmp_path / "sharded" / "config.json").read_text())))
    item = media_items("one-image")[0]
    ids = vl_prompt([item])
    expected = reference_vl_logits(ref, "qwen2_5_vl", ids, [item])
    for directory in (tmp_path / "sharded", nested):
        model = load_multimodal_model(directory)
        with torch.inference_mode():
            media = model.encode_vision(item.pixel_values, [item.grid])[0]
            mrope = mrope_positions(ids, [VisionItem(item.grid)], model.config.vision)
            got = model.compute_logits(model(torch.tensor(ids), mrope.positions, NoCache(torch.arange(len(ids))), media=media))
        assert (got - expected).abs().max().item() < TOL


def test_text_checkpoint_is_not_taken_for_multimodal(tmp_path):
    save_tiny("qwen2", tmp_path)
    with pytest.raises(QwenkitError, match="not a multimodal one"):
        load_multimodal_model(tmp_path)


def test_released_qwen2_audio_config_layout():
    """Qwen2-Audio-7B's config lists only the text fields that differ from transformers' Qwen2Config defaults."""
    config = ModelConfig.from_hf_dict({
        "model_type": "qwen2_audio", "audio_token_index": 151646,
        "audio_config": {"model_type": "qwen2_audio_encoder", "d_model": 1280, "encoder_layers": 32,
                         "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "num_mel_bins": 128},
        "text_config": {"model_type": "qwen2", "vocab_size": 156032, "intermediate_size": 11008,
                        "max_position_embeddings": 8192, "rope_theta": 10000},
    })
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.vocab_size) == (4096, 32, 32, 156032)
    assert config.audio.audio_token_id == 151646 and config.audio.max_source_positions == 1500
    assert config.mrope_section == () and config.vision is None


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen2_audio"])
def test_config_round_trips_through_hf_dict(arch):
    config = ModelConfig.from_hf_dict((audio_config() if arch == "qwen2_audio" else vl_config(arch)).to_dict())
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    again = transformers.AutoConfig.for_model(**config.to_hf_dict())  # transformers reads it back too
    assert ModelConfig.from_hf_dict(again.to_dict()) == config


def test_mrope_positions_by_hand():
    """Hand-computed: text, a 2x(4x6)-patch Qwen2.5-VL video at 2 tokens/s and 1 s per grid, text.

    The video's merged grid is 2 x 2 x 3; temporal positions step by 2, so its largest position
    (start + 2) exceeds its height/width extent, and the text after it starts one past that
    (Qwen's rule; transformers 5 would start it at start + 3 and overlap).
    """
    vision = ModelConfig.from_hf_dict(vl_config("qwen2_5_vl").to_dict()).vision
    ids = [1, 2, VIDEO, VIDEO, VIDEO, VIDEO, VIDEO, VIDEO, VIDEO, VIDEO, VIDEO, VIDEO, VIDEO, VIDEO, 3]
    mrope = mrope_positions(ids, [VisionItem((2, 4, 6), is_video=True, seconds_per_grid=1.0)], vision)
    t, h, w = mrope.positions.tolist()
    assert t == [0, 1] + [2] * 6 + [4] * 6 + [5]
    assert h == [0, 1] + [2, 2, 2, 3, 3, 3] * 2 + [5]
    assert w == [0, 1] + [2, 3, 4, 2, 3, 4] * 2 + [5]
    assert mrope.delta == 6 - len(ids)
    assert mrope.for_decode(len(ids), 2).tolist() == [[6, 7]] * 3


def test_greedy_tokens_equal_transformers_generate(vl_models):
    """transformers' generate decodes with its cached rope deltas; qwenkit continues at i + delta."""
    arch, ref, model = vl_models
    items = media_items("two-images")
    ids = vl_prompt(items)
    with torch.inference_mode():
        ids_t = torch.tensor(ids)[None]
        expected = ref.generate(
            input_ids=ids_t, attention_mask=torch.ones_like(ids_t), mm_token_type_ids=(ids_t == IMAGE).long(),
            pixel_values=torch.cat([i.pixel_values for i in items]), image_grid_thw=torch.tensor([i.grid for i in items]),
            max_new_tokens=6, do_sample=False, pad_token_id=0,
        )[0, len(ids):].tolist()
        media = torch.cat(model.encode_vision(torch.cat([i.pixel_values for i in items]), [i.grid for i in items]))
        mrope = mrope_positions(ids, vision_items(items), model.config.vision)
        tokens = list(ids)
        for _ in range(6):
            positions = torch.cat([mrope.positions, mrope.for_decode(len(ids), len(tokens) - len(ids))], dim=1)
            order = torch.arange(len(tokens))
            hidden = model(torch.tensor(tokens), positions, NoCache(order), media=media)
            tokens.append(int(model.compute_logits(hidden[-1:]).argmax()))
    assert tokens[len(ids):] == expected
