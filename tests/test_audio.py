"""Audio: the Whisper-style encoder (HF parity, padding invariance, token counts, gradients), its config, and
decoding + log-mel features on a real clip of the shared spoken-words shard."""

from __future__ import annotations

import importlib.util
import io
import math
import tarfile
import tempfile
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny import SHARED
from mimo_titan.checkpoint.hf_whisper import (
    audio_config_from_hf,
    audio_state_from_hf,
    audio_state_to_hf,
    hf_audio_config,
)
from mimo_titan.config import AudioModelConfig, _build, _check_cross_keys, _Ctx
from mimo_titan.data.audio import decode_audio, log_mel
from mimo_titan.errors import ConfigError, DataError
from mimo_titan.models.audio import AudioEncoder, audio_tokens

SPEECH = SHARED / "speech" / "spoken-words-0000.tar"
HAS_SCIPY = importlib.util.find_spec("scipy") is not None

TINY = dict(
    num_mel_bins=80,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=128,
    max_source_positions=50,
    projector_intermediate_size=48,
)


def _cfg(**kw) -> AudioModelConfig:
    return AudioModelConfig(**{**TINY, **kw})


def _encoder(seed: int = 0, **kw) -> AudioEncoder:
    torch.manual_seed(seed)
    enc = AudioEncoder(_cfg(**kw), lm_hidden_size=32)
    enc.init_weights()
    return enc.eval()


def _validated(table: dict, prefix: str = "model.audio") -> AudioModelConfig:
    """Build and check an ``[model.audio]`` table as the loader does (range checks, then the cross-key checks)."""
    ctx = _Ctx("<test>")
    cfg = _build(AudioModelConfig, table, prefix, ctx)
    for obj, p in ctx.built:
        _check_cross_keys(obj, p, ctx)
    return cfg


# ------------------------------------------------------------------------------------------------------- config
def test_config_defaults_and_checks() -> None:
    cfg = _validated({k: v for k, v in TINY.items() if k not in ("num_mel_bins", "max_source_positions")})
    assert (cfg.num_mel_bins, cfg.max_source_positions, cfg.layer_norm_eps, cfg.pool) == (80, 1500, 1e-5, 1)
    assert (cfg.frozen, cfg.prefetch_microbatches) == (False, 2)
    with pytest.raises(ConfigError, match=r"model\.audio\.hidden_size.*not divisible by num_heads=5"):
        _validated({**TINY, "num_heads": 5})
    with pytest.raises(ConfigError, match=r"model\.audio\.hidden_size.*odd"):
        _validated({**TINY, "hidden_size": 9, "num_heads": 3})
    with pytest.raises(ConfigError, match=r"model\.audio\.pool"):
        _validated({**TINY, "pool": 0})
    with pytest.raises(ConfigError, match=r"model\.audio\.layer_norm_eps"):
        _validated({**TINY, "layer_norm_eps": 0.0})


# ------------------------------------------------------------------------------------------------ HF parity
def _hf_encoder(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_cfg = transformers.WhisperConfig(
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=128,
        num_mel_bins=80,
        max_source_positions=50,
    )
    model = transformers.WhisperModel(hf_cfg).eval()
    with torch.no_grad():  # HF zeroes the biases at init: randomize them so the name map is tested on every tensor
        for name, p in model.encoder.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf_cfg, model


def test_whisper_import_export_parity(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from mimo_titan.checkpoint.hf import save_hf_dir

    hf_cfg, model = _hf_encoder()
    fields = audio_config_from_hf(hf_cfg.to_dict())
    assert fields == {**{k: TINY[k] for k in fields if k in TINY}, "layer_norm_eps": 1e-5}
    cfg = AudioModelConfig(**fields, projector_intermediate_size=48)
    ours = AudioEncoder(cfg, 32)
    ours.init_weights()
    state = audio_state_from_hf(model.state_dict(), cfg)  # WhisperModel keys: encoder.* (+ the decoder, ignored)
    assert not any(k.startswith("projector.") for k in state)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert sorted(missing) == sorted(k for k in ours.state_dict() if k.startswith("projector.")) and not unexpected
    ours.eval()

    torch.manual_seed(1)
    feats = torch.randn(2, 80, 2 * 50)  # HF's encoder takes exactly 2 * max_source_positions frames
    with torch.no_grad():
        ref = model.encoder(feats).last_hidden_state
        got = ours.encode_frames(feats)
        got_masked = ours.encode_frames(feats, torch.tensor([100, 100]))
    assert got.shape == (2, 50, 64)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_masked, ref, atol=1e-4, rtol=0)

    # the other HF layouts read the same
    for prefix in ("model.encoder.", ""):
        alt = {prefix + k.removeprefix("encoder."): v for k, v in model.state_dict().items() if "encoder." in k}
        alt = {**alt, "proj_out.weight": torch.zeros(1)} if prefix else alt
        assert audio_state_from_hf(alt, cfg).keys() == state.keys()

    # export: strict load into a fresh WhisperEncoder, same outputs; and through a save_pretrained-like directory
    exported = audio_state_to_hf(ours.state_dict(), cfg)
    fresh = transformers.models.whisper.modeling_whisper.WhisperEncoder(hf_cfg).eval()
    fresh.load_state_dict(exported, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(feats).last_hidden_state, ref, atol=1e-4, rtol=0)
    save_hf_dir(str(tmp_path), hf_audio_config(cfg), exported)
    loaded = transformers.models.whisper.modeling_whisper.WhisperEncoder.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(feats).last_hidden_state, ref, atol=1e-4, rtol=0)
    assert set(audio_state_to_hf(ours.state_dict(), cfg, prefix="model.encoder.")) == {
        "model.encoder." + k for k in exported
    }


def test_whisper_import_errors() -> None:
    _, model = _hf_encoder()
    cfg = _cfg()
    hf_state = model.state_dict()
    bad = {k: v for k, v in hf_state.items() if k != "encoder.layers.1.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing \['encoder\.layers\.1\.fc2\.bias'\]"):
        audio_state_from_hf(bad, cfg)
    with pytest.raises(ValueError, match=r"unexpected \['encoder\.layers\.0\.self_attn\.k_proj\.bias'\]"):
        audio_state_from_hf({**hf_state, "encoder.layers.0.self_attn.k_proj.bias": torch.zeros(64)}, cfg)
    with pytest.raises(ValueError, match=r"unexpected \['encoder\.layers\.1\..* \(15 in all\)"):
        audio_state_from_hf(hf_state, _cfg(num_layers=1))
    with pytest.raises(ValueError, match=r"'encoder\.embed_positions\.weight' has shape \[50, 64\].*\[60, 64\]"):
        audio_state_from_hf(hf_state, _cfg(max_source_positions=60))
    with pytest.raises(ValueError, match="model_type='wav2vec2'"):
        audio_config_from_hf({"model_type": "wav2vec2"})
    with pytest.raises(ValueError, match="activation_function='relu'"):
        audio_config_from_hf({"model_type": "whisper", "activation_function": "relu"})
    with pytest.raises(ValueError, match="layer_norm_eps"):
        hf_audio_config(_cfg(layer_norm_eps=1e-6))
    # defaults of a config.json written with use_diff
    assert audio_config_from_hf({"model_type": "whisper"})["hidden_size"] == 384


# ------------------------------------------------------------------------------------------ encoder behaviour
def test_audio_tokens() -> None:
    want = {1: [0, 1, 1, 2, 50], 2: [0, 1, 1, 1, 25], 3: [0, 1, 1, 1, 17]}
    for pool, counts in want.items():
        assert [audio_tokens(f, _cfg(pool=pool)) for f in (0, 1, 2, 3, 100)] == counts
    with pytest.raises(ValueError):
        audio_tokens(-1, _cfg())


@pytest.mark.parametrize("pool", [1, 2, 3])
def test_padding_invariance_and_row_count(pool: int) -> None:
    enc = _encoder(pool=pool, max_source_positions=64)
    torch.manual_seed(2)
    lengths = [37, 0, 100, 1, 64]
    t = max(lengths)
    feats = torch.randn(len(lengths), 80, t) * 2  # the padding is garbage, not zeros: it must not leak in
    with torch.no_grad():
        rows = enc(feats, torch.tensor(lengths))
        counts = [audio_tokens(f, enc.cfg) for f in lengths]
        assert rows.shape == (sum(counts), 32)
        assert torch.equal(enc.num_tokens(torch.tensor(lengths)), torch.tensor(counts))
        for i, (f, chunk) in enumerate(zip(lengths, rows.split(counts))):
            alone = enc(feats[i : i + 1, :, :f], torch.tensor([f]))
            assert alone.shape == chunk.shape
            torch.testing.assert_close(chunk, alone, atol=1e-5, rtol=0)
        # the same clip padded more (frames beyond the batch's longest): same rows again
        more = enc(torch.cat([feats, torch.randn(len(lengths), 80, 21)], dim=2), torch.tensor(lengths))
        torch.testing.assert_close(more, rows, atol=1e-5, rtol=0)


def test_pooling_is_a_mean_of_encoder_frames() -> None:
    enc1, enc3 = _encoder(pool=1), _encoder(pool=3)
    enc3.load_state_dict(enc1.state_dict())
    feats, n = torch.randn(1, 80, 14), torch.tensor([13])  # 7 encoder frames: groups of 3, 3, 1
    with torch.no_grad():
        h = enc1.encode_frames(feats, n)[0, :7]
        want = enc1.projector(torch.stack([h[0:3].mean(0), h[3:6].mean(0), h[6]]))
        torch.testing.assert_close(enc3(feats, n), want, atol=1e-6, rtol=0)


def test_encoder_errors() -> None:
    enc = _encoder()
    with pytest.raises(DataError, match="max_source_positions=50"):
        enc(torch.zeros(1, 80, 101), torch.tensor([101]))
    with pytest.raises(ValueError, match="num_mel_bins=80"):
        enc(torch.zeros(1, 128, 10), torch.tensor([10]))
    with pytest.raises(ValueError, match=r"values in \[0, 10\]"):
        enc(torch.zeros(1, 80, 10), torch.tensor([11]))


def test_init_weights_deterministic() -> None:
    a, b = _encoder(seed=5).state_dict(), _encoder(seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.conv1.weight"], _encoder(seed=6).state_dict()["encoder.conv1.weight"])
    pos = a["encoder.embed_positions.weight"]
    assert pos.shape == (50, 64) and torch.equal(pos[0], torch.cat([torch.zeros(32), torch.ones(32)]))
    assert "encoder.embed_positions.weight" not in dict(_encoder().named_parameters())  # a buffer: no gradient


def test_gradients_reach_every_parameter() -> None:
    enc = _encoder(pool=2).train()
    torch.manual_seed(3)
    lengths = torch.tensor([30, 7, 0, 55])
    rows = enc(torch.randn(4, 80, 55), lengths)
    (rows.square().mean() + rows.sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------- data: decoding
def _clips(n: int) -> list[tuple[str, bytes]]:
    if not SPEECH.exists():
        pytest.skip(f"{SPEECH} not found")
    out = []
    with tarfile.open(SPEECH) as tar:
        for member in tar:
            if member.name.endswith(".wav"):
                f = tar.extractfile(member)
                assert f is not None
                out.append((member.name, f.read()))
                if len(out) == n:
                    break
    return out


def _wav_bytes(samples: np.ndarray, rate: int, width: int = 2) -> bytes:
    """``[T, C]`` float samples in [-1, 1] → a PCM wav of ``width`` bytes per sample."""
    if width == 1:
        pcm = np.round(samples * 127 + 128).astype(np.uint8).tobytes()
    elif width == 2:
        pcm = np.round(samples * 32767).astype("<i2").tobytes()
    else:
        pcm = np.round(samples * (2**31 - 1)).astype("<i4").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def test_decode_and_log_mel_real_clips() -> None:
    transformers = pytest.importorskip("transformers")
    extractor = transformers.WhisperFeatureExtractor()  # Whisper's defaults: 80 bins, 16 kHz, 30-s windows
    for name, data in _clips(3):
        with wave.open(io.BytesIO(data)) as w:
            assert w.getframerate() == 16000
            n = w.getnframes()
        x = decode_audio(data, "wav", name)
        assert x.dtype == torch.float32 and x.shape == (n,) and 0.01 < x.abs().max() <= 1.0
        mel = log_mel(x)
        f = n // 160
        assert mel.dtype == torch.float32 and mel.shape == (80, f) and f == round(n / 16000 * 100 - 0.5)
        ref = torch.from_numpy(extractor(x.numpy(), sampling_rate=16000, return_tensors="np")["input_features"][0])
        assert ref.shape == (80, 3000)
        inside = min(f, (n - 200) // 160 + 1)  # frames whose 400-sample window ends inside the clip
        assert inside >= f - 1
        torch.testing.assert_close(mel[:, :inside], ref[:, :inside], atol=1e-5, rtol=0)
        assert mel.max() <= ref.max() + 1e-6 and mel.min() >= mel.max() - 2.0 - 1e-6  # the max - 8 floor, /4
    assert log_mel(torch.zeros(100)).shape == (80, 0)
    assert log_mel(torch.randn(170), num_mel_bins=128).shape == (128, 1)


def test_decode_formats_and_errors() -> None:
    t = np.arange(1600) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t))[:, None]
    for width in (1, 2, 4):
        x = decode_audio(_wav_bytes(tone, 16000, width), ".WAV")
        torch.testing.assert_close(
            x, torch.from_numpy(tone[:, 0]).float(), atol=max(1.5 / 2 ** (8 * width - 1), 1e-7), rtol=0
        )
    stereo = np.concatenate([tone, -0.5 * tone], axis=1)
    torch.testing.assert_close(
        decode_audio(_wav_bytes(stereo, 16000), "wav"), torch.from_numpy(0.25 * tone[:, 0]).float(), atol=1e-4, rtol=0
    )
    good = _wav_bytes(tone, 16000)
    with pytest.raises(DataError, match=r"'broken\.wav' does not decode as wav"):
        decode_audio(b"RIFF\x00\x01garbage" * 10, "wav", "broken.wav")
    with pytest.raises(DataError, match="truncated"):
        decode_audio(good[:-101], "wav", "cut.wav")
    with pytest.raises(DataError, match="'mp3' is not supported"):
        decode_audio(good, "mp3")
    if importlib.util.find_spec("soundfile") is None:
        with pytest.raises(DataError, match="pip install soundfile"):
            decode_audio(b"fLaC", "flac", "x.flac")
    else:
        with pytest.raises(DataError, match="does not decode as flac"):
            decode_audio(b"fLaC garbage", "flac", "x.flac")


def test_resample_8khz() -> None:
    t = np.arange(4000) / 8000  # 0.5 s at 8 kHz
    data = _wav_bytes((0.5 * np.sin(2 * np.pi * 300 * t))[:, None], 8000)
    if not HAS_SCIPY:
        with pytest.raises(DataError, match=r"'low\.wav' is sampled at 8000 Hz.*pip install scipy"):
            decode_audio(data, "wav", "low.wav")
        return
    x = decode_audio(data, "wav", "low.wav")
    assert x.shape == (8000,)  # the length doubles
    want = 0.5 * np.sin(2 * np.pi * 300 * np.arange(8000) / 16000)
    assert np.abs(x.numpy() - want)[200:-200].max() < 1e-2  # the 300-Hz tone survives, away from the edges
    assert math.isclose(float(x.square().mean()), 0.125, rel_tol=0.05)


# -- audio in the data pipeline ---------------------------------------------------------------------------------------
CC12M_SPEECH = SHARED / "speech" / "cc12m-speech-0000.tar"


def _audio_processor(pool: int = 8):
    from mimo_titan.data import ImageTextProcessor

    cfg = _cfg(pool=pool)
    return ImageTextProcessor(SHARED / "tokenizer", 32, 4, audio_tokens=lambda f: audio_tokens(f, cfg)), cfg


def test_processor_adds_audio_tokens_and_lays_out_clips() -> None:
    """The shared tokenizer has no audio tokens: they are added after its last id; a record's clip becomes
    <|begin_of_audio|> <|audio|>*R <|end_of_audio|> after its image block, never truncated."""
    from mimo_titan.data import ImageTextProcessor

    plain = ImageTextProcessor(SHARED / "tokenizer", 32, 4)
    proc, _ = _audio_processor()
    assert proc.added_tokens == ["<|audio|>", "<|begin_of_audio|>", "<|end_of_audio|>"]
    assert proc.vocab_size == plain.vocab_size + 3 and proc.audio_token_id >= plain.vocab_size
    assert proc.audio_token_id not in proc.tokenize("a cat <|audio|> sat")  # caption text cannot inject one
    seq = proc.build_sequence([[7, 8, 9]], max_tokens=100, audio_tokens=[5])
    img = [proc.begin_image_id, *[proc.image_token_id] * 4, proc.end_image_id]
    aud = [proc._special_ids["begin_audio_id"], *[proc.audio_token_id] * 5, proc._special_ids["end_audio_id"]]
    assert seq == [proc.bos_id, *img, *aud, 7, 8, 9, proc.eos_id]
    cut = proc.build_sequence([[7, 8, 9]], max_tokens=15, audio_tokens=[5])  # captions go first, never the clip
    assert cut.count(proc.audio_token_id) == 5 and len(cut) == 15
    with pytest.raises(ConfigError, match=r"training.seq_len is too small: .*audio clips of \[30\] tokens"):
        proc.build_sequence([[7]], max_tokens=20, audio_tokens=[30])


def test_loader_batches_carry_clips_and_matching_placeholders() -> None:
    """Every sample of a batch from the speech shard holds exactly audio_tokens(F) <|audio|> placeholders for its
    clip of F frames, ignored by the loss; slicing and concatenating keep clips with their samples."""
    from mimo_titan.data import MimoDataLoader
    from mimo_titan.data.collate import concat_batches

    proc, cfg = _audio_processor()
    loader = MimoDataLoader(CC12M_SPEECH, proc, global_batch_size=6, seq_len=96, shuffle=False)
    b = next(loader)
    assert b.audio_features is not None and b.audio_features.shape[:2] == (6, 80)
    assert b.clips_per_sample.tolist() == [1] * 6
    expected = [audio_tokens(int(f), cfg) for f in b.audio_frames]
    assert (b.input_ids == proc.audio_token_id).sum(1).tolist() == expected
    assert not (b.labels == proc.audio_token_id).any()
    assert len(set(b.audio_frames.tolist())) > 1  # clips of different lengths share the batch
    parts = [b.slice(0, 2), b.slice(2, 6)]
    again = concat_batches(parts)
    assert torch.equal(again.audio_frames, b.audio_frames)
    for i, f in enumerate(b.audio_frames.tolist()):
        assert torch.equal(again.audio_features[i, :, :f], b.audio_features[i, :, :f])
    assert parts[1].audio_frames.tolist() == b.audio_frames[2:].tolist()


def test_a_corrupt_clip_skips_its_record() -> None:
    from mimo_titan.data import MimoDataLoader

    with tarfile.open(CC12M_SPEECH) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.name.startswith("00000000")}
    keys = sorted({n.split(".")[0] for n in members})[:3]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for k in keys:
            for ext in ("jpg", "txt", "wav"):
                data = members[f"{k}.{ext}"] if not (k == keys[1] and ext == "wav") else b"RIFF-not-a-wav"
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    path = Path(tempfile.mkdtemp()) / "s.tar"
    path.write_bytes(buf.getvalue())
    proc, _ = _audio_processor()
    loader = MimoDataLoader(path, proc, global_batch_size=2, seq_len=96)
    next(loader)  # the header check of every rank skips it: no rank decodes it
    assert loader.stats["corrupt_audio"] == 1 and loader.stats["records"] == 2 and loader.stats["decoded_audio"] == 2


def test_a_clip_longer_than_the_encoder_takes_is_refused_before_training() -> None:
    from mimo_titan.data import ImageTextProcessor, MimoDataLoader

    cfg = _cfg(pool=8)
    proc = ImageTextProcessor(
        SHARED / "tokenizer",
        32,
        4,
        audio_tokens=lambda f: audio_tokens(f, cfg),
        audio_max_frames=200,
        audio_key="model.speech",
    )
    with pytest.raises(ConfigError, match=r"model.speech.max_source_positions=100 holds 2 s of audio, but \d+ clip"):
        MimoDataLoader(CC12M_SPEECH, proc, global_batch_size=2, seq_len=128)


def test_a_seq_len_too_short_for_the_longest_clip_is_refused_before_training() -> None:
    from mimo_titan.data import MimoDataLoader

    proc, _ = _audio_processor(pool=8)  # 2-5 s clips -> 17-34 tokens
    # the start-up check reads the first batch's records (here all 32)
    with pytest.raises(
        ConfigError, match=r"training.seq_len=32 is too small for the data: .* set training.seq_len >= 4"
    ):
        MimoDataLoader(CC12M_SPEECH, proc, global_batch_size=32, seq_len=32)
    # later in the stream a clip too long for seq_len is skipped and counted, with one warning naming the keys
    loader = MimoDataLoader(CC12M_SPEECH, proc, global_batch_size=2, seq_len=32, shuffle=False)
    for _ in range(14):
        batch = next(loader)
        frames = batch.audio_frames.tolist()
        assert all(1 + 6 + audio_tokens(f, _cfg(pool=8)) + 2 <= 33 for f in frames)
    assert loader.stats["audio_too_long"] == 4 and loader.stats["records"] == 28
