"""Qwen2-VL, Qwen2.5-VL and Qwen2-Audio as llama.cpp ships them: a language model GGUF plus an mmproj GGUF.

The files in fixtures/mmproj_gguf/ were written by llama.cpp's own convert_hf_to_gguf.py from tiny
random checkpoints (fixtures/make_mmproj_gguf.py regenerates them); the same seed rebuilds the
transformers reference here. Checked: logits with one image, two images and a video within 1e-4
of transformers (Qwen2.5-VL's mmproj in f32; Qwen2-VL's in f16, against a reference whose vision
weights are rounded to f16 as the converter rounded them), and with audio clips (the converter
keeps the audio convolutions in f16: rounded alike); greedy chat through the engine equal
to transformers' generate; the Q8_0 language model's blocks in place beside the float vision
tower; `qwenkit serve` on the directory (the mmproj found beside the model) through the official
`openai` client; and clear errors for files that do not go together.
"""

from pathlib import Path

import numpy as np
import openai
import pytest
import torch
import transformers

from qwenkit.engine import LLM, SamplingParams
from qwenkit.errors import QwenkitError
from qwenkit.model.attention import NoCache
from qwenkit.model.mrope import mrope_positions
from qwenkit.quantization.gguf_linear import KERNEL_MAX_TOKENS
from qwenkit.weights.loader import Quantization, load_model
from server_process import ServerProcess
from test_multimodal_engine import GREEDY, VL_CASES, img_part, image, media_of, reference_generate, text, user
from test_multimodal_models import media_items, reference_vl_logits, run_stepwise, vision_items, vl_prompt
from fixtures.make_mmproj_gguf import GGUF_AUDIO_LAYERS, GGUF_VISION
from qwenkit.model.qwen2_audio import audio_token_count
from qwenkit.multimodal.audio import log_mel_features
from test_multimodal_engine import audio_part
from tiny_multimodal import AUDIO, audio_config, save_tiny_multimodal, vl_config

FIXTURES = Path(__file__).parent / "fixtures" / "mmproj_gguf"
MMPROJ_TYPE = {"qwen2_vl": "f16", "qwen2_5_vl": "f32"}
TOL = 1e-4


def model_file(arch: str, kind: str = "f32") -> str:
    return str(FIXTURES / f"tiny-{arch}-{kind}.gguf")


def mmproj_file(arch: str) -> str:
    return str(FIXTURES / f"mmproj-tiny-{arch}-{MMPROJ_TYPE[arch]}.gguf")


def reference(arch: str, tmp_path: Path):
    """transformers' model of the fixture's weights (vision weights rounded to f16 where the mmproj is f16)."""
    ref = save_tiny_multimodal(arch, tmp_path, vl_config(arch, **GGUF_VISION))
    if MMPROJ_TYPE[arch] == "f16":
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.startswith("model.visual.") and p.ndim >= 2:  # the converter keeps 1-D tensors in f32
                    p.copy_(p.half().float())
    return ref


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def pair(request, tmp_path_factory):
    arch = request.param
    ref = reference(arch, tmp_path_factory.mktemp(arch))
    loaded = load_model(model_file(arch), "float32", quantize=None, mmproj=mmproj_file(arch))
    embed = ref.get_input_embeddings().weight
    assert torch.equal(loaded.model.model.embed_tokens.weight, embed), "fixtures differ from the seeded model: run make_mmproj_gguf.py"
    return arch, ref, loaded


@pytest.mark.parametrize("case", ["one-image", "two-images", "video"])
def test_gguf_and_mmproj_logits_match_transformers(pair, case):
    arch, ref, loaded = pair
    model = loaded.model
    assert loaded.config.model_type == arch and loaded.config.mrope_section == (2, 3, 3)
    items = media_items(case)
    ids = vl_prompt(items)
    expected = reference_vl_logits(ref, arch, ids, items)
    with torch.inference_mode():
        media = torch.cat(model.encode_vision(torch.cat([i.pixel_values for i in items]), [i.grid for i in items]))
        positions = mrope_positions(ids, vision_items(items), model.config.vision).positions
        got = model.compute_logits(model(torch.tensor(ids), positions, NoCache(torch.arange(len(ids))), media=media))
    assert (got - expected).abs().max().item() < TOL


def test_qwen2_5_vl_windows_are_the_mmproj_defaults():
    """An mmproj states no window size: 112 px as llama.cpp assumes, full attention every n_wa_pattern-th block."""
    vision = load_model(model_file("qwen2_5_vl"), "float32", quantize=None, mmproj=mmproj_file("qwen2_5_vl")).config.vision
    expected = vl_config("qwen2_5_vl", **GGUF_VISION).vision_config
    assert vision.window_size == expected.window_size == 112
    assert list(vision.fullatt_block_indexes) == expected.fullatt_block_indexes == [1, 3]
    assert vision.hidden_act == "silu" and vision.tokens_per_second == expected.tokens_per_second


@pytest.mark.parametrize("case", ["one-image", "two-images"])
def test_gguf_vl_greedy_chat_equals_transformers_generate(pair, case):
    _, ref, loaded = pair
    messages = VL_CASES[case]()
    out = LLM(loaded).chat(messages, GREEDY)[0]
    items = media_of(loaded, messages)
    assert out.outputs[0].token_ids == reference_generate(ref, out.prompt_token_ids, items)


def test_q8_0_blocks_in_place_with_the_float_vision_tower(tmp_path):
    """The usual files: a quantized language model run by the native kernels, the tower in float.
    Prefilled in two chunks (each short enough for the kernels) and decoded through the paged cache,
    its logits follow transformers on the same dequantized values up to int8 activation rounding."""
    loaded = load_model(model_file("qwen2_5_vl", "q8_0"), mmproj=mmproj_file("qwen2_5_vl"))
    if loaded.plan.quantization != Quantization.GGUF_BLOCKS:
        pytest.skip("no native kernels on this machine")
    exact = load_model(model_file("qwen2_5_vl", "q8_0"), "float32", quantize=None, mmproj=mmproj_file("qwen2_5_vl")).model
    ref = save_tiny_multimodal("qwen2_5_vl", tmp_path, vl_config("qwen2_5_vl", **GGUF_VISION))
    language = {"model.language_model." + k.removeprefix("model."): v for k, v in exact.state_dict().items() if k.startswith("model.")}
    missing, unexpected = ref.load_state_dict(language | {"lm_head.weight": exact.lm_head.weight}, strict=False)
    assert not unexpected and all(k.startswith("model.visual.") for k in missing)
    items = media_items("two-images")
    prompt = vl_prompt(items)
    ids = prompt + [60, 61, 62]
    expected = reference_vl_logits(ref, "qwen2_5_vl", ids, items)
    model = loaded.model
    with torch.inference_mode():
        media = torch.cat(model.encode_vision(torch.cat([i.pixel_values for i in items]), [i.grid for i in items]))
        mrope = mrope_positions(prompt, vision_items(items), model.config.vision)
        positions = torch.cat([mrope.positions, mrope.for_decode(len(prompt), len(ids) - len(prompt))], dim=1)
        chunk_end = 3 + 1 + items[0].num_tokens // 2  # inside the first image
        assert chunk_end <= KERNEL_MAX_TOKENS and len(prompt) - chunk_end <= KERNEL_MAX_TOKENS
        got = run_stepwise(model, ids, positions, media, chunk_end, len(prompt))
    want = torch.cat([expected[chunk_end - 1 : chunk_end], expected[len(prompt) - 1 :]])
    error = (got - want).abs().max().item()
    assert 0 < error < 2e-2 * want.abs().max().item()  # not 0: the kernels, not a float copy, ran


def test_files_that_do_not_go_together_are_clear_errors(tmp_path):
    with pytest.raises(QwenkitError, match="is a multimodal projector .* pass this file as --mmproj"):
        load_model(mmproj_file("qwen2_vl"))
    with pytest.raises(QwenkitError, match="is not a multimodal projector"):
        load_model(model_file("qwen2_vl"), mmproj=model_file("qwen2_5_vl"))
    with pytest.raises(QwenkitError, match="no such mmproj file"):
        load_model(model_file("qwen2_vl"), mmproj=str(tmp_path / "missing.gguf"))
    truncated = tmp_path / "mmproj-truncated.gguf"
    truncated.write_bytes(Path(mmproj_file("qwen2_5_vl")).read_bytes()[:150_000])
    with pytest.raises(QwenkitError):
        load_model(model_file("qwen2_5_vl"), mmproj=str(truncated))
    with pytest.raises(QwenkitError, match="Qwen2-Audio's encoder goes with a 'qwen2' one"):
        load_model(model_file("qwen2_vl"), mmproj=str(FIXTURES / "mmproj-tiny-qwen2_audio-f32.gguf"))
    with pytest.raises(QwenkitError, match="an mmproj vision tower needs a 'qwen2vl' one"):
        load_model(model_file("qwen2_audio"), mmproj=mmproj_file("qwen2_vl"))
    # Without its mmproj the language model is a text model (M-RoPE on text is 1-D rotary).
    text_only = load_model(model_file("qwen2_vl"), "float32", quantize=None)
    assert text_only.config.model_type == "qwen2" and text_only.processor is None


@pytest.fixture(scope="module")
def audio_pair(tmp_path_factory):
    ref = save_tiny_multimodal("qwen2_audio", tmp_path_factory.mktemp("audio"), audio_config(GGUF_AUDIO_LAYERS))
    with torch.no_grad():  # the converter writes the two convolutions in f16 whatever the output type
        for name, p in ref.named_parameters():
            if ".conv" in name and name.endswith("weight"):
                p.copy_(p.half().float())
    loaded = load_model(model_file("qwen2_audio"), "float32", quantize=None, mmproj=str(FIXTURES / "mmproj-tiny-qwen2_audio-f32.gguf"))
    return ref, loaded


@pytest.mark.parametrize("seconds", [0.73, 30.0])  # 30 s: every frame is audio
def test_audio_gguf_and_mmproj_logits_match_transformers(audio_pair, seconds):
    ref, loaded = audio_pair
    model = loaded.model
    assert loaded.config.model_type == "qwen2_audio" and loaded.config.audio.encoder_layers == GGUF_AUDIO_LAYERS
    samples = (0.1 * np.random.default_rng(1).standard_normal(int(16000 * seconds))).astype(np.float32)
    extractor = transformers.WhisperFeatureExtractor(feature_size=128)
    inputs = extractor(samples, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    features = log_mel_features(samples)
    ids = torch.tensor([5, 6, 40] + [AUDIO] * audio_token_count(features.num_frames) + [41, 7, 8, 9])
    with torch.inference_mode():
        expected = ref(input_ids=ids[None], input_features=inputs["input_features"], feature_attention_mask=inputs["attention_mask"]).logits[0]
        media = model.encode_audio(features.features, features.num_frames)
        positions = torch.arange(len(ids))
        got = model.compute_logits(model(ids, positions, NoCache(positions), media=media))
    assert (got - expected).abs().max().item() < TOL


def test_audio_gguf_greedy_chat_equals_transformers_generate(audio_pair):
    ref, loaded = audio_pair
    messages = user(audio_part(1.5), text("what is said"))
    out = LLM(loaded).chat(messages, GREEDY)[0]
    items = media_of(loaded, messages)
    assert out.prompt_token_ids.count(AUDIO) == items[0].num_tokens > 0
    assert out.outputs[0].token_ids == reference_generate(ref, out.prompt_token_ids, items)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    """A directory as a llama.cpp user keeps one: the model and its mmproj side by side."""
    d = tmp_path_factory.mktemp("vl-gguf")
    for src in (model_file("qwen2_5_vl", "q8_0"), mmproj_file("qwen2_5_vl")):
        (d / Path(src).name).write_bytes(Path(src).read_bytes())
    return d


def test_serve_a_gguf_directory_with_its_mmproj_through_the_openai_client(gguf_dir):
    server = ServerProcess("--model", str(gguf_dir), "--served-model-name", "vl")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        content = [img_part(image(100, 70)), text("what is this")]
        r = client.chat.completions.create(model="vl", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=6)
        expected = LLM(str(gguf_dir)).chat(user(*content), SamplingParams(temperature=0, max_tokens=6))[0]
        assert r.choices[0].message.content == expected.outputs[0].text
        assert r.usage.prompt_tokens == len(expected.prompt_token_ids) > 20  # the image's placeholder tokens are in
        audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
        with pytest.raises(openai.BadRequestError, match="does not take audio"):
            client.chat.completions.create(model="vl", messages=[{"role": "user", "content": [audio]}], max_tokens=2)
    finally:
        server.stop()


def test_cli_chat_takes_mmproj_and_an_image(tmp_path):
    """`qwenkit chat --model M.gguf --mmproj P.gguf --image F`, as llama.cpp's mtmd CLI is called."""
    import subprocess
    import sys

    cat = tmp_path / "cat.png"
    image(100, 70).save(cat)
    model, mmproj = model_file("qwen2_5_vl", "q8_0"), mmproj_file("qwen2_5_vl")
    result = subprocess.run([sys.executable, "-m", "qwenkit.cli.main", "chat", "--model", model, "--mmproj", mmproj,
                             "-p", "what is it", "--image", str(cat), "--max-tokens", "5", "--temperature", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    messages = user({"type": "image", "image": str(cat)}, text("what is it"))
    expected = LLM(model, mmproj=mmproj).chat(messages, SamplingParams(temperature=0, max_tokens=5))[0].outputs[0].text
    assert result.stdout.rstrip("\n") == expected
