"""Audio for Qwen2-Audio: decode, resample to 16 kHz, Whisper log-mel features.

The features equal transformers' WhisperFeatureExtractor (128 mel bins, as Qwen2-Audio's processor
configures it): the clip is zero-padded to 30 s, a 400-point Hann STFT with hop 160 gives 3000
frames, Slaney-style mel filters map power to mel bands, and the log10 values are clamped to 8
below their maximum and scaled. How many of the 3000 frames hold audio decides how many
placeholder tokens the clip takes (see qwenkit.model.qwen2_audio.audio_token_count).
"""

from __future__ import annotations

import io
import math
import wave
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from qwenkit.errors import QwenkitError
from qwenkit.multimodal.ffmpeg import open_media
from qwenkit.multimodal.key import content_key

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000


@dataclass(frozen=True)
class AudioFeatures:
    features: torch.Tensor  # [mel bins, 3000] float32
    num_frames: int  # frames that hold audio (the rest is padding)

    @cached_property
    def key(self) -> str:
        """Content key (see qwenkit.multimodal.key)."""
        return content_key("audio", (self.num_frames,), self.features)


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], sample rate) of a PCM WAV file."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise QwenkitError(f"cannot decode the audio as WAV ({exc})") from exc
    if width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        samples = np.frombuffer(raw, dtype=f"<i{width}").astype(np.float32) / -float(np.iinfo(dtype).min)
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8  # sign-extend 24-bit
        samples = ints.astype(np.float32) / 2**23
    else:
        raise QwenkitError(f"unsupported WAV sample width of {width} bytes")
    samples = samples[: len(samples) // channels * channels].reshape(-1, channels).mean(axis=1)
    return samples.astype(np.float32), rate


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate) of an audio file: WAV by the standard library, anything
    else (mp3, flac, ogg...) by PyAV. Channels are averaged."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return decode_wav(data)
    with open_media(data, "audio") as container:
        if not container.streams.audio:
            raise QwenkitError("the file has no audio stream")
        stream = container.streams.audio[0]
        import av

        # Planar float32 whatever the codec's sample format: [channels, samples] per frame.
        to_float = av.AudioResampler(format="fltp", layout=stream.layout, rate=stream.rate)
        chunks = [f.to_ndarray() for frame in container.decode(stream) for f in to_float.resample(frame)]
        chunks += [f.to_ndarray() for f in to_float.resample(None)]
        rate = stream.rate
    if not chunks:
        raise QwenkitError("the audio file holds no samples")
    return np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32), rate


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling (Hann-windowed sinc, 6 zero crossings, rolloff 0.99) to `target` Hz.

    A polyphase filter: for each of the `new` output phases of a rational rate change orig -> new
    (reduced by their gcd) one windowed-sinc kernel, applied as one strided convolution.
    """
    if rate <= 0:
        raise QwenkitError(f"audio sample rate must be positive, got {rate}")
    if rate == target or len(samples) == 0:
        return np.asarray(samples, dtype=np.float32)
    gcd = math.gcd(rate, target)
    orig, new = rate // gcd, target // gcd
    zero_crossings, rolloff = 6, 0.99
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zero_crossings * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new + taps[None, :]) * cutoff
    t = t.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernels = (sinc * window * cutoff / orig).to(torch.float32)[:, None, :]
    x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    x = F.pad(x[None, None], (width, width + orig))
    out = F.conv1d(x, kernels, stride=orig)[0].T.reshape(-1)
    return out[: math.ceil(new * len(samples) / orig)].numpy()


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels[log_region] = 15.0 + np.log(freq[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    freq[log_region] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels[log_region] - 15.0))
    return freq


@lru_cache(maxsize=4)
def mel_filters(num_mel_bins: int) -> torch.Tensor:
    """[frequency bins, mel bins] triangular Slaney-normalised filters over 0-8 kHz."""
    bins = 1 + N_FFT // 2
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, bins)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([8000.0]))[0], num_mel_bins + 2))
    slopes = edges[None, :] - fft_freqs[:, None]
    gaps = np.diff(edges)
    down = -slopes[:, :-2] / gaps[:-1]
    up = slopes[:, 2:] / gaps[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (edges[2 : num_mel_bins + 2] - edges[:num_mel_bins])  # equal energy per band
    return torch.from_numpy(filters).to(torch.float32)


def log_mel_features(samples: np.ndarray, num_mel_bins: int = 128) -> AudioFeatures:
    """Features of 16 kHz mono `samples` (at most 30 s) padded to 30 s."""
    if len(samples) == 0:
        raise QwenkitError("the audio clip is empty")
    if len(samples) > N_SAMPLES:
        raise QwenkitError(f"the audio clip lasts {len(samples) / SAMPLE_RATE:.1f} s; Qwen2-Audio takes at most {CHUNK_SECONDS} s")
    padded = np.zeros(N_SAMPLES, dtype=np.float32)
    padded[: len(samples)] = samples
    stft = torch.stft(torch.from_numpy(padded), N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    log_spec = (mel_filters(num_mel_bins).T @ power).clamp(min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return AudioFeatures((log_spec + 4.0) / 4.0, math.ceil(len(samples) / HOP_LENGTH))


def preprocess_audio(samples: np.ndarray, rate: int, num_mel_bins: int = 128) -> AudioFeatures:
    """Features of mono `samples` at `rate` Hz, resampled to 16 kHz first when needed."""
    return log_mel_features(resample(samples, rate), num_mel_bins)
