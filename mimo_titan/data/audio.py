"""Audio decoding and Whisper's log-mel features.

- :func:`decode_audio`: the bytes of a ``.wav`` or ``.flac`` file → a float32 mono waveform at 16 kHz.
- :func:`log_mel`: a 16-kHz waveform → Whisper's log-mel spectrogram ``[num_mel_bins, F]``, one frame per 10 ms,
  not padded to Whisper's 30-s window (the encoder masks each clip's padding itself, see
  :class:`mimo_titan.models.audio.AudioEncoder`).

Dependencies: ``wav`` needs only the standard library (:mod:`wave`). :func:`log_mel` computes the features with
``transformers.WhisperFeatureExtractor`` (so ``transformers`` is a runtime dependency for audio). Two are optional
and only needed by the files that use them: ``soundfile`` (``pip install soundfile``) decodes ``flac``, and
``scipy`` (``pip install scipy``) resamples audio recorded at another rate than 16 kHz; without them those files
raise a :class:`~mimo_titan.errors.DataError` that names the package.

Method: Radford et al., "Robust Speech Recognition via Large-Scale Weak Supervision" (Whisper, 2022): 25-ms Hann
windows (400 samples) every 10 ms (160 samples), power spectrum, ``num_mel_bins`` Slaney mel filters up to 8 kHz,
``log10`` clamped at 1e-10, then at the clip's maximum - 8, then ``(x + 4) / 4``.
"""

from __future__ import annotations

import functools
import importlib
import io
import math
import wave
from typing import Any

import numpy as np
import torch

from mimo_titan.errors import DataError

__all__ = [
    "MissingAudioPackage",
    "SAMPLE_RATE",
    "HOP_LENGTH",
    "N_FFT",
    "decode_audio",
    "resample",
    "log_mel",
    "num_mel_frames",
    "probe_audio",
]

#: samples per second of every waveform this module returns
SAMPLE_RATE = 16000
#: samples between two log-mel frames (10 ms)
HOP_LENGTH = 160
#: samples of one analysis window (25 ms)
N_FFT = 400


class MissingAudioPackage(DataError):
    """A file needs an optional package that is not installed (``soundfile`` for flac, ``scipy`` to resample): an
    environment problem, not a damaged sample."""


def _optional(module: str) -> Any | None:
    """``module`` if it is installed, else ``None`` (imported by name: mypy needs no stubs for it)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _where(source: str | None) -> str:
    return f"audio file {source!r}" if source else "an audio file"


def _pcm_to_float(raw: bytes, width: int, channels: int) -> np.ndarray:
    """Interleaved little-endian PCM → ``[frames, channels]`` float32 in [-1, 1)."""
    if width == 1:  # 8-bit wav is unsigned, centered at 128
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:  # 24-bit: sign-extend three bytes into the top of an int32
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float32) / float(2**23)
    else:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / float(2**31)
    return x.reshape(-1, channels)


def _decode_wav(data: bytes, where: str) -> tuple[np.ndarray, int]:
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(frames)
    except (wave.Error, EOFError, ValueError) as e:
        raise DataError(
            f"{where} does not decode as wav ({e}); only uncompressed PCM wav (8/16/24/32-bit integer samples) is "
            "read: convert the file, e.g. `ffmpeg -i in.wav -c:a pcm_s16le out.wav`, or drop it"
        ) from e
    if width not in (1, 2, 3, 4) or channels < 1:
        raise DataError(f"{where}: wav with {width}-byte samples and {channels} channels cannot be read; use PCM")
    if rate <= 0:
        raise DataError(f"{where}: wav header gives a sample rate of {rate} Hz; the file is damaged")
    if len(raw) != frames * channels * width:
        raise DataError(
            f"{where} is truncated: its header announces {frames} frames ({frames * channels * width} bytes) but "
            f"it holds {len(raw)} bytes of samples; re-encode or drop the file"
        )
    return _pcm_to_float(raw, width, channels), rate


def _decode_flac(data: bytes, where: str) -> tuple[np.ndarray, int]:
    sf = _optional("soundfile")
    if sf is None:
        raise MissingAudioPackage(f"{where} is flac, which needs the soundfile package: `pip install soundfile`")
    try:
        x, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, TypeError) as e:  # soundfile's LibsndfileError is a RuntimeError
        raise DataError(f"{where} does not decode as flac ({e}); re-encode or drop the file") from e
    return np.asarray(x, dtype=np.float32), int(rate)


def resample(waveform: torch.Tensor, rate: int, source: str | None = None) -> torch.Tensor:
    """Resample a ``[T]`` float32 waveform from ``rate`` Hz to 16 kHz (``SAMPLE_RATE``).

    Polyphase filtering, ``scipy.signal.resample_poly(x, 16000 / g, rate / g)`` with ``g = gcd(rate, 16000)``
    (a Kaiser-windowed FIR low-pass); the result has ``ceil(T * 16000 / rate)`` samples. 16 kHz input is returned
    unchanged.

    Raises:
        DataError: ``rate`` is not 16 kHz and scipy is not installed (the message names the rate and the fix).
    """
    if rate == SAMPLE_RATE:
        return waveform
    signal = _optional("scipy.signal")
    if signal is None:
        raise MissingAudioPackage(
            f"{_where(source)} is sampled at {rate} Hz; resampling to {SAMPLE_RATE} Hz needs scipy: "
            f"`pip install scipy`, or convert the data set to 16 kHz first (e.g. `ffmpeg -i in -ar 16000 out.wav`)"
        )
    g = math.gcd(rate, SAMPLE_RATE)
    out = signal.resample_poly(waveform.double().numpy(), SAMPLE_RATE // g, rate // g)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def decode_audio(data: bytes, ext: str, source: str | None = None) -> torch.Tensor:
    """Decode the bytes of an audio file into a ``[T]`` float32 mono waveform at 16 kHz, samples in [-1, 1].

    Args:
        data: the file's bytes.
        ext: its format, ``"wav"`` or ``"flac"`` (case and a leading dot ignored).
        source: the file's name (or tar member), for error messages.

    ``wav``: uncompressed PCM, 8-bit (unsigned), 16-, 24- or 32-bit (signed) integer samples, read with the standard
    library's :mod:`wave`. ``flac``: read with ``soundfile``. Several channels are averaged into one; another
    sample rate than 16 kHz is converted with :func:`resample`.

    Raises:
        DataError: an unsupported ``ext``; bytes that do not decode (naming the problem); a flac file without
            ``soundfile`` installed or another rate than 16 kHz without ``scipy`` (naming the package to install).
    """
    where = _where(source)
    kind = ext.lower().lstrip(".")
    if kind == "wav":
        x_TC, rate = _decode_wav(data, where)
    elif kind == "flac":
        x_TC, rate = _decode_flac(data, where)
    else:
        raise DataError(f"{where}: audio format {ext!r} is not supported; use wav or flac")
    mono = x_TC.mean(axis=1, dtype=np.float32) if x_TC.shape[1] > 1 else x_TC[:, 0]
    return resample(torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)), rate, source)


def probe_audio(data: bytes, ext: str, source: str | None = None) -> int:
    """The log-mel frames :func:`log_mel` would give for an audio file, read from its header without decoding it.

    A language-model rank needs a clip's length (its ``<|audio|>`` placeholder count) but not its features; this
    reads the wav header with :mod:`wave` (and checks that the file holds all the samples it announces) or the
    flac header with ``soundfile.info``. The samples at 16 kHz are ``n`` or ``ceil(n * 16000 / rate)`` after
    :func:`resample`, and the frames ``samples // 160`` (:func:`num_mel_frames`), exactly what decoding gives.

    Args:
        data: The file's bytes.
        ext: ``"wav"`` or ``"flac"``.
        source: The file's name (or tar member), for messages.

    Returns:
        The number of 10-ms log-mel frames ``F`` (``>= 0``).

    Raises:
        DataError: The header does not parse, the file is shorter than its header says, an unsupported ``ext``;
            :class:`MissingAudioPackage` for flac without ``soundfile`` or another rate than 16 kHz without
            ``scipy`` (the decode would need them, so every rank finds out alike).
    """
    where = _where(source)
    kind = ext.lower().lstrip(".")
    if kind == "wav":
        try:
            with wave.open(io.BytesIO(data), "rb") as w:
                channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
                available = len(w.readframes(frames))  # a copy of the samples; no conversion
        except (wave.Error, EOFError, ValueError) as e:
            raise DataError(f"{where} does not decode as wav ({e}); only uncompressed PCM wav is read") from e
        if width not in (1, 2, 3, 4) or channels < 1 or rate <= 0:
            raise DataError(f"{where}: wav with {width}-byte samples, {channels} channels, {rate} Hz cannot be read")
        if available != frames * channels * width:
            raise DataError(f"{where} is truncated: its header announces {frames} frames but fewer are present")
    elif kind == "flac":
        sf = _optional("soundfile")
        if sf is None:
            raise MissingAudioPackage(f"{where} is flac, which needs the soundfile package: `pip install soundfile`")
        try:
            info = sf.info(io.BytesIO(data))
        except (RuntimeError, ValueError, TypeError) as e:
            raise DataError(f"{where} does not decode as flac ({e}); re-encode or drop the file") from e
        frames, rate = int(info.frames), int(info.samplerate)
    else:
        raise DataError(f"{where}: audio format {ext!r} is not supported; use wav or flac")
    if rate != SAMPLE_RATE and _optional("scipy.signal") is None:
        resample(torch.zeros(1), rate, source)  # raises MissingAudioPackage naming the rate and the fix
    samples = frames if rate == SAMPLE_RATE else -(-frames * SAMPLE_RATE // rate)
    return num_mel_frames(samples)


def num_mel_frames(num_samples: int) -> int:
    """Log-mel frames :func:`log_mel` gives for ``num_samples`` samples at 16 kHz: one per whole 10 ms."""
    return num_samples // HOP_LENGTH


@functools.lru_cache(maxsize=4)
def _extractor(num_mel_bins: int) -> Any:
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH, n_fft=N_FFT, chunk_length=30
    )


def log_mel(waveform: torch.Tensor, num_mel_bins: int = 80) -> torch.Tensor:
    """Whisper's log-mel spectrogram of a 16-kHz waveform, not padded: ``[T]`` float → ``[num_mel_bins, F]`` float32.

    ``F = T // 160`` (:func:`num_mel_frames`): one frame per whole 10 ms. Computed by
    ``transformers.WhisperFeatureExtractor`` (n_fft 400, hop 160, 16 kHz) with ``padding="longest"``, so the clip is
    not padded to 30 s: frame ``j`` equals frame ``j`` of the extractor's usual 30-s output wherever the window
    stays inside the clip (every frame but the last, whose window reaches past the end: Whisper pads with zeros,
    we reflect the clip's end as ``torch.stft`` does). The ``max - 8`` floor uses this clip's own maximum. Clips
    shorter than 201 samples are zero-padded to 201 (``torch.stft``'s reflect padding needs more samples than half a
    window) and still give ``T // 160`` frames.

    Args:
        waveform: ``[T]`` float samples at 16 kHz (see :func:`decode_audio`).
        num_mel_bins: 80 (Whisper) or 128 (Whisper large-v3); ``model.<audio>.num_mel_bins``.

    Raises:
        ValueError: a waveform that is not 1-D.
    """
    if waveform.dim() != 1:
        raise ValueError(f"log_mel takes a [samples] mono waveform, got shape {list(waveform.shape)}")
    frames = num_mel_frames(waveform.numel())
    if frames == 0:
        return torch.zeros(num_mel_bins, 0)
    x = waveform.detach().to("cpu", torch.float32).numpy()
    if x.size <= N_FFT // 2:
        x = np.pad(x, (0, N_FFT // 2 + 1 - x.size))
    out = _extractor(num_mel_bins)(
        x, sampling_rate=SAMPLE_RATE, padding="longest", truncation=False, return_tensors="np"
    )["input_features"][0]
    return torch.from_numpy(np.ascontiguousarray(out[:, :frames], dtype=np.float32))
