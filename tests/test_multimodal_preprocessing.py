"""Media preprocessing equals transformers' processors: Qwen2VLImageProcessor (PIL backend) for
images and video frames, WhisperFeatureExtractor for audio; resampling against an analytic sine."""

import io
import wave

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from qwenkit.errors import QwenkitError
from qwenkit.multimodal.audio import decode_wav, log_mel_features, mel_filters, preprocess_audio, resample
from qwenkit.multimodal.image import ImageLimits, decode_image, preprocess_image, smart_resize
from qwenkit.multimodal.video import VideoLimits, preprocess_video, sample_frame_indices

RNG = np.random.default_rng(0)
# Odd sizes and aspect ratios: below min_pixels, above max_pixels, tall, wide, nearly square, prime.
SIZES = [(37, 53), (640, 480), (13, 700), (1001, 999), (3000, 20), (222, 111), (1, 150)]


def random_image(width, height, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def reference(image, **limits):
    out = transformers.Qwen2VLImageProcessorPil(**limits)(images=[image], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"][0].tolist()


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_image_pixels_and_grid_equal_the_reference(size):
    image = random_image(*size)
    expected_pixels, expected_grid = reference(image)
    got = preprocess_image(image)
    assert list(got.grid) == expected_grid
    assert got.pixel_values.shape == expected_pixels.shape
    assert torch.equal(got.pixel_values, expected_pixels)


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_per_request_pixel_limits_and_colour_modes(mode):
    image = random_image(500, 300, mode)
    limits = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    expected_pixels, expected_grid = reference(image, **limits)
    got = preprocess_image(image, ImageLimits(**limits))
    assert list(got.grid) == expected_grid and got.grid[1] * got.grid[2] <= 16 * 4
    assert torch.equal(got.pixel_values, expected_pixels)


def test_image_from_file_bytes():
    image = random_image(90, 61)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert torch.equal(preprocess_image(buffer.getvalue()).pixel_values, reference(image)[0])


def test_bad_images_are_clear_errors():
    with pytest.raises(QwenkitError, match="cannot decode the image"):
        decode_image(b"not an image at all")
    with pytest.raises(QwenkitError, match="aspect ratio"):
        smart_resize(10, 2500, 56 * 56, 28 * 28 * 1280)
    with pytest.raises(QwenkitError, match="min_pixels"):
        ImageLimits(min_pixels=10_000, max_pixels=5_000)


def test_video_frames_are_the_image_pixels_two_frames_deep():
    """Each frame, resized and normalised, sits in its temporal slot (odd counts repeat the last frame)."""
    frames = [random_image(120, 90) for _ in range(3)]
    limits = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 20)
    video = preprocess_video(frames, VideoLimits(**limits, fps=2.0))
    t, h, w = video.grid
    assert t == 2 and video.seconds_per_grid == 1.0
    slots = video.pixel_values.view(t, h * w, 3, 2, 14 * 14)
    for i, frame in enumerate(frames + frames[-1:]):
        pixels, grid = reference(frame, **limits)
        assert grid == [1, h, w]
        assert torch.equal(slots[i // 2, :, :, i % 2], pixels.view(h * w, 3, 2, 196)[:, :, 0])


def test_video_frame_sampling():
    # 30 frames at 30 fps sampled at 2 fps: 2 frames, raised to min_frames 4, evenly spread.
    assert sample_frame_indices(30, 30.0, VideoLimits()) == [0, 7, 15, 22]
    # 10 s at 10 fps sampled at 1 fps: 10 frames (even).
    assert sample_frame_indices(100, 10.0, VideoLimits(fps=1.0)) == list(range(0, 100, 10))
    frames = [random_image(56, 56) for _ in range(30)]
    video = preprocess_video(frames, VideoLimits(min_pixels=56 * 56, max_pixels=56 * 56), source_fps=30.0)
    assert video.grid == (2, 4, 4) and video.seconds_per_grid == pytest.approx(2 / (4 / 1.0))


@pytest.mark.parametrize("seconds", [0.31, 4.0, 30.0])
def test_log_mel_equals_whisper_feature_extractor(seconds):
    samples = (0.2 * RNG.standard_normal(int(16000 * seconds))).astype(np.float32)
    extractor = transformers.WhisperFeatureExtractor(feature_size=128)
    expected = extractor(samples, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    got = log_mel_features(samples)
    assert got.features.shape == (128, 3000)
    assert (got.features - expected["input_features"][0]).abs().max().item() < 1e-5
    assert got.num_frames == int(expected["attention_mask"].sum())
    assert np.abs(mel_filters(128).numpy() - extractor.mel_filters).max() < 1e-7


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_to_16k_keeps_a_sine(rate):
    t = np.arange(rate) / rate
    samples = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 1500 * t)).astype(np.float32)
    out = resample(samples, rate)
    t16 = np.arange(len(out)) / 16000
    expected = 0.5 * np.sin(2 * np.pi * 440 * t16) + 0.3 * np.sin(2 * np.pi * 1500 * t16)
    assert len(out) == 16000
    assert np.abs(out - expected)[300:-300].max() < 2e-3  # away from the clip's edges


def test_resampling_removes_what_16k_cannot_hold():
    rate = 44100
    tone = np.sin(2 * np.pi * 12000 * np.arange(rate) / rate).astype(np.float32)  # above 8 kHz Nyquist
    assert np.abs(resample(tone, rate))[300:-300].max() < 0.01


def test_wav_decoding_and_limits():
    rate, seconds = 22050, 0.5
    left = (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(np.stack([left, left], axis=1).tobytes())
    samples, got_rate = decode_wav(buffer.getvalue())
    assert got_rate == rate and np.allclose(samples, left / 32768, atol=1e-6)
    features = preprocess_audio(samples, got_rate)
    assert features.num_frames == 50  # 0.5 s at 100 frames per second
    with pytest.raises(QwenkitError, match="cannot decode the audio"):
        decode_wav(b"RIFF....garbage")
    with pytest.raises(QwenkitError, match="at most 30 s"):
        log_mel_features(np.zeros(16000 * 31, dtype=np.float32))


def test_placeholder_expansion():
    from qwenkit.multimodal.prompt import expand_placeholders

    ids = [1, 92, 90, 93, 2, 92, 91, 93, 3, 92, 90, 93]  # image, video, image between start/end tokens
    assert expand_placeholders(ids, {90: [2, 3], 91: [4]}) == (
        [1, 92, 90, 90, 93, 2, 92, 91, 91, 91, 91, 93, 3, 92, 90, 90, 90, 93]
    )
    with pytest.raises(QwenkitError, match="more placeholders"):
        expand_placeholders(ids, {90: [2], 91: [4]})
    with pytest.raises(QwenkitError, match="no placeholder"):
        expand_placeholders(ids, {90: [2, 3, 4], 91: [4]})


def encode_audio_file(samples: np.ndarray, rate: int, codec: str, container: str) -> bytes:
    av = pytest.importorskip("av")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def test_flac_and_mp3_audio_through_pyav():
    from qwenkit.multimodal.audio import decode_audio

    rate = 44100
    ints = (0.4 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate) * 32767).astype(np.int16)
    samples, got_rate = decode_audio(encode_audio_file(ints, rate, "flac", "flac"))
    assert got_rate == rate and np.array_equal(samples, ints / 32768)  # lossless: every sample back
    samples, got_rate = decode_audio(encode_audio_file(ints, rate, "libmp3lame", "mp3"))
    assert got_rate == rate and abs(len(samples) - rate) < 3000  # mp3 adds encoder delay and padding
    assert abs(np.abs(samples).max() - 0.4) < 0.02
    with pytest.raises(QwenkitError, match="cannot decode the audio"):
        decode_audio(b"\x00\x01 definitely not audio" * 10)


def test_video_file_is_sampled_while_decoding():
    av = pytest.importorskip("av")
    from qwenkit.multimodal.video import decode_video

    frames = [np.full((112, 140, 3), 8 * i, dtype=np.uint8) for i in range(30)]  # 30 frames, 1 s at 30 fps
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 140, 112, "yuv420p"
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    limits = VideoLimits(min_pixels=56 * 56, max_pixels=28 * 28 * 30)
    video = decode_video(buffer.getvalue(), limits)
    # 1 s at 2 fps is 2 frames, raised to min_frames 4: frames 0, 7, 15, 22, two per temporal patch.
    assert video.grid == (2, 8, 10) and video.seconds_per_grid == pytest.approx(0.5)
    expected = preprocess_video([Image.fromarray(frames[i]) for i in (0, 7, 15, 22)], limits)
    assert (video.pixel_values - expected.pixel_values).abs().mean().item() < 0.05  # lossy codec
    with pytest.raises(QwenkitError, match="cannot decode the video"):
        decode_video(b"\x00 not a video" * 10)


def test_content_keys_follow_what_the_encoder_reads():
    image = random_image(90, 61)
    png, bmp = io.BytesIO(), io.BytesIO()
    image.save(png, format="PNG")
    image.save(bmp, format="BMP")
    same = preprocess_image(png.getvalue())
    assert same.key == preprocess_image(bmp.getvalue()).key  # same pixels, other file format
    assert same.key != preprocess_image(random_image(90, 61)).key
    assert same.key != preprocess_image(image, ImageLimits(max_pixels=28 * 28 * 4)).key  # other budget
    frames = [random_image(56, 56) for _ in range(2)]
    limits = VideoLimits(min_pixels=56 * 56, max_pixels=56 * 56)
    assert preprocess_video(frames, limits).key != preprocess_video(frames, VideoLimits(min_pixels=56 * 56, max_pixels=56 * 56, fps=1.0)).key
    clip = (0.1 * RNG.standard_normal(8000)).astype(np.float32)
    assert log_mel_features(clip).key == log_mel_features(clip.copy()).key != log_mel_features(clip[:7000]).key
