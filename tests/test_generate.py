"""Generation: KV-cache decoding against the full forward, token choice, ``scripts/generate.py`` (one image, a shard,
an HF export, every user error), and that a tiny model trained through the real launcher learns to caption a
synthetic shapes data set."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from _tiny import SHARED, config_toml, tiny_config_dict, write_tar
from mimo_titan.checkpoint import save_full_model_state
from mimo_titan.checkpoint.hf import export_hf
from mimo_titan.config import config_from_dict
from mimo_titan.inference import (
    Prompt,
    SamplingParams,
    build_prompt,
    generate_tokens,
    load_model,
    next_tokens,
    resolve_checkpoint,
)
from mimo_titan.models import MimoModel
from mimo_titan.models.kv_cache import KVCache
from mimo_titan.models.mimo import merge_image_embeddings
from mimo_titan.models.moe import MoE
from mimo_titan.train.trainer import build_processor

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(SHARED / "tokenizer")


def V(offset: int, n: int, **kw) -> dict:
    return dict(rank_offset=offset, num_ranks=n, **kw)


AUDIO = {  # a Whisper-style encoder: 0.5 s -> 50 frames -> 25 encoder frames -> 2 LM tokens (pool 16)
    "type": "audio",
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 64,
    "projector_intermediate_size": 64,
    "pool": 16,
    "max_source_positions": 100,  # clips up to 2 s
}
MOE = {"num_experts": 4, "top_k": 2, "intermediate_size": 32}


def _cfg_dict(audio: bool = False, moe: bool = False) -> dict:
    """The tests' tiny model (4 image tokens, seq_len 48), one process, the shared tokenizer."""
    d = tiny_config_dict(V(0, 1), V(0, 1), data={"tokenizer": TOKENIZER})
    if audio:
        d["model"]["audio"] = dict(AUDIO)
        d["parallelism"]["audio"] = V(0, 1)
    if moe:
        d["model"]["language"]["moe"] = dict(MOE)
    return d


def _model(cfg, seed: int = 0) -> MimoModel:
    proc = build_processor(cfg)
    audio_id = proc.audio_token_id if proc.audio_tokens is not None else None
    model = MimoModel(cfg.model, proc.image_token_id, audio_token_id=audio_id)
    model.init_weights(seed)
    return model.eval()


def _png(colour, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (40, 30), tuple(rng.randint(0, 255) for _ in range(3)))
    ImageDraw.Draw(img).ellipse([5, 5, 25, 25], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds: float, freq: float = 440.0) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    pcm = np.round(0.5 * np.sin(2 * math.pi * freq * t) * 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    return buf.getvalue()


def _write_shard(path: Path, records: dict[str, dict[str, bytes]]) -> None:
    write_tar(path, [(f"{key}.{ext}", data) for key, fields in records.items() for ext, data in fields.items()])


def _script(name: str):
    """``scripts/<name>.py`` as a module, to call its ``main(argv)`` in this process."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_script, evaluate_script = _script("generate"), _script("evaluate")


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = generate_script.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_cached_decoding_gives_the_logits_of_the_full_forward(moe):
    cfg = config_from_dict(_cfg_dict(moe=moe))
    model = _model(cfg, seed=3)
    assert any(isinstance(m, MoE) for m in model.lm.modules()) == moe
    proc = build_processor(cfg)
    prompt = proc.build_sequence([[]], 1 << 30)[:-1]  # BOS, the image block
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 1990, (2, 9), generator=g)
    ids = torch.cat([torch.tensor([prompt, prompt]), text], dim=1)  # [2, 16]
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    P = len(prompt)
    with torch.no_grad():
        full = model(ids, pixels)  # [2, 16, V], no cache
        cache = KVCache(ids.shape[1])
        dense = model.encode(ids[:, :P], pixels)
        embeds = merge_image_embeddings(model.lm.embed(ids[:, :P]), ids[:, :P], dense, proc.image_token_id)
        parts = [model.lm(ids[:, :P], inputs_embeds=embeds, kv_cache=cache)]
        start = P
        for n in (1, 2, 1, 1, 3, 1):  # decode steps of one token, and chunks (lower-right causal mask)
            parts.append(model.lm(ids[:, start : start + n], kv_cache=cache))
            start += n
    assert start == ids.shape[1] and cache.length == ids.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="KV cache holds at most 16 tokens; 16 cached"):
        model.lm(ids[:, :1], kv_cache=cache)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_generation_with_and_without_the_cache_chooses_the_same_tokens(moe):
    cfg = config_from_dict(_cfg_dict(moe=moe))
    model, proc = _model(cfg, seed=5), build_processor(cfg)
    prompts = [build_prompt(cfg, proc, image=_png(c, s), image_source="x") for c, s in (("red", 1), ("blue", 2))]
    for params in (SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=1.5, top_p=0.9)):
        runs = [
            generate_tokens(
                model,
                cfg.model,
                prompts,
                params,
                stop_ids=[],  # no stop: every step is compared
                max_positions=cfg.training.seq_len,
                generator=torch.Generator().manual_seed(7),
                use_cache=use_cache,
            )
            for use_cache in (True, False)
        ]
        assert runs[0] == runs[1] and [len(r) for r in runs[0]] == [8, 8]
    # the model never reads more than seq_len positions: a P-token prompt with seq_len P + 2 generates 3 tokens
    P = len(prompts[0].input_ids)
    got = generate_tokens(model, cfg.model, prompts[:1], SamplingParams(50), stop_ids=[], max_positions=P + 2)
    assert len(got[0]) == 3


def test_next_tokens_greedy_temperature_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    greedy = next_tokens(logits[:2], SamplingParams())
    assert greedy.tolist() == [0, 0]
    allowed = torch.tensor([False, True, True, True])
    assert next_tokens(logits[:1], SamplingParams(), allowed_V=allowed).tolist() == [1]

    def freq(params, allowed=None):
        draws = next_tokens(logits, params, torch.Generator().manual_seed(0), allowed)
        return torch.bincount(draws, minlength=4).double() / len(draws)

    # top-p keeps the most likely tokens until their mass reaches p: {0, 1} for p = 0.7, {0, 1, 2} for p = 0.85
    torch.testing.assert_close(
        freq(SamplingParams(temperature=1.0, top_p=0.7)),
        torch.tensor([0.625, 0.375, 0, 0]).double(),
        atol=0.015,
        rtol=0,
    )
    torch.testing.assert_close(
        freq(SamplingParams(temperature=1.0, top_p=0.85)),
        (probs * torch.tensor([1, 1, 1, 0]) / 0.95).double(),
        atol=0.015,
        rtol=0,
    )
    torch.testing.assert_close(freq(SamplingParams(temperature=1.0)), probs.double(), atol=0.015, rtol=0)
    hot = probs.pow(0.5) / probs.pow(0.5).sum()  # temperature 2: p ** (1 / 2), renormalised
    torch.testing.assert_close(freq(SamplingParams(temperature=2.0)), hot.double(), atol=0.015, rtol=0)
    for bad, match in (
        (dict(max_new_tokens=0), "--max-new-tokens"),
        (dict(temperature=-1.0), "--temperature"),
        (dict(top_p=0.0), "--top-p"),
    ):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)


# ------------------------------------------------------------------------------------------------ command line
def _greedy_reference(model: MimoModel, proc, prompt: Prompt, n: int, audio_name: str | None = None) -> str:
    """Plain greedy decoding: the whole model rerun on the sequence for every token, stopping at a layout token."""
    ids = list(prompt.input_ids)
    out: list[int] = []
    enc: dict = {"vision": (prompt.pixel_values,)}
    if audio_name is not None:
        feats = prompt.audio_features
        assert feats is not None
        enc[audio_name] = (feats.unsqueeze(0), torch.tensor([feats.shape[1]]))
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), encoder_inputs=enc)[0, -1]
            logits[proc.vocab_size :] = float("-inf")
            token = int(logits.argmax())
            if token in proc.layout_token_ids:
                break
            ids.append(token)
            out.append(token)
    return proc.decode(out)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A config file, a checkpoint folder (step-1, step-2: the newest is taken) and the model of step-2."""
    tmp = tmp_path_factory.mktemp("gen")
    d = _cfg_dict()
    (tmp / "run.toml").write_text(config_toml(d))
    cfg = config_from_dict(d)
    save_full_model_state(_model(cfg, seed=1).state_dict(), str(tmp / "ckpt" / "step-1"))
    model = _model(cfg, seed=11)
    save_full_model_state(model.state_dict(), str(tmp / "ckpt" / "step-2"))
    (tmp / "ckpt" / "step-3.partial").mkdir()  # an interrupted save is never taken
    return tmp, cfg, model


def test_cli_single_image_and_shard_match_plain_greedy_decoding(tiny_run, tmp_path, capsys):
    run, cfg, model = tiny_run
    proc = build_processor(cfg)
    images = {"a": _png("red", 1), "b": _png("green", 2)}
    refs = {}
    for key, data in images.items():
        (tmp_path / f"{key}.png").write_bytes(data)
        refs[key] = _greedy_reference(model, proc, build_prompt(cfg, proc, image=data, image_source=key), 6)
    assert refs["a"] and refs["b"]  # the untrained model says something
    common = ["--config", run / "run.toml", "--checkpoint", run / "ckpt", "--max-new-tokens", 6, "--device", "cpu"]
    rc, out, err = _run(capsys, *common, "--image", tmp_path / "a.png")
    assert (rc, out) == (0, refs["a"] + "\n"), err

    shard = tmp_path / "shard.tar"
    _write_shard(
        shard,
        {
            "k0": {"png": images["a"], "txt": b" a red circle \n"},
            "k1": {"jpg": images["b"]},  # no caption: reference null
            "k2": {"txt": b"no image"},  # skipped
            "k3": {"png": b"not an image", "txt": b"broken"},  # skipped
            "k4": {"png": images["a"], "txt": b" \n"},  # an empty caption: no reference either
        },
    )
    rc, out, err = _run(capsys, *common, "--data", shard, "--out", tmp_path / "out.jsonl", "--batch-size", 2)
    assert rc == 0, err
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert lines == [
        {"key": "k0", "reference": "a red circle", "generated": refs["a"]},
        {"key": "k1", "reference": None, "generated": refs["b"]},
        {"key": "k4", "reference": None, "generated": refs["a"]},
    ]
    assert "k2: no image" in err and "k3.png: cannot decode image" in err
    assert "wrote 3 lines" in err and "2 records skipped" in err
    from mimo_titan.evaluation import evaluate, read_samples

    scores = evaluate(read_samples(tmp_path / "out.jsonl"))  # the lines without a reference are not scored
    assert scores["samples"] == 1 and scores["no_reference"] == 2


def test_checkpoint_forms_and_hf_export_load_the_same_weights(tiny_run, tmp_path, capsys):
    run, cfg, model = tiny_run
    want = model.state_dict()
    assert resolve_checkpoint(str(run / "ckpt"), cfg) == ("dcp", str(run / "ckpt" / "step-2"))
    export_hf(cfg.model, want, str(tmp_path / "hf"), "llama")
    assert resolve_checkpoint(str(tmp_path / "hf"), cfg) == ("hf", str(tmp_path / "hf"))
    for source in (run / "ckpt" / "step-2", tmp_path / "hf"):
        loaded, _ = load_model(cfg, str(source), device=torch.device("cpu"))
        got = loaded.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), source
    (tmp_path / "img.png").write_bytes(_png("blue", 3))
    texts = []
    for source, flag in ((run / "ckpt", []), (tmp_path / "hf", ["--hf"])):
        rc, out, err = _run(
            capsys, "--config", run / "run.toml", "--checkpoint", source, *flag, "--image", tmp_path / "img.png"
        )
        assert rc == 0, err
        texts.append(out)
    assert texts[0] == texts[1]


def test_cli_with_an_audio_clip(tmp_path, capsys):
    d = _cfg_dict(audio=True)
    (tmp_path / "run.toml").write_text(config_toml(d))
    cfg = config_from_dict(d)
    model, proc = _model(cfg, seed=2), build_processor(cfg)
    save_full_model_state(model.state_dict(), str(tmp_path / "ckpt"))
    (tmp_path / "img.png").write_bytes(_png("red"))
    (tmp_path / "clip.wav").write_bytes(_wav(0.5))
    prompt = build_prompt(cfg, proc, image=_png("red"), image_source="i", audio=_wav(0.5), audio_source="a")
    assert prompt.input_ids.count(proc.audio_token_id) == 2  # 50 frames -> 25 -> 2 tokens of 16
    ref = _greedy_reference(model, proc, prompt, 5, audio_name="audio")
    base = ["--config", tmp_path / "run.toml", "--checkpoint", tmp_path / "ckpt", "--max-new-tokens", 5]
    rc, out, err = _run(capsys, *base, "--image", tmp_path / "img.png", "--audio", tmp_path / "clip.wav")
    assert (rc, out) == (0, ref + "\n"), err
    # bad clips: not audio, too long for the encoder
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    (tmp_path / "long.wav").write_bytes(_wav(2.5))
    for clip, parts in (
        ("bad.wav", ["bad.wav: cannot decode the audio clip"]),
        ("long.wav", ["long.wav: the clip has 250 log-mel frames", "model.audio.max_source_positions = 100"]),
    ):
        rc, out, err = _run(capsys, *base, "--image", tmp_path / "img.png", "--audio", tmp_path / clip)
        assert rc == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
        assert all(p in err for p in parts), err


def test_user_errors_print_one_line_and_exit_2(tiny_run, tmp_path, capsys):
    run, cfg, model = tiny_run
    (tmp_path / "img.png").write_bytes(_png("red"))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "clip.wav").write_bytes(_wav(0.5))
    export_hf(cfg.model, model.state_dict(), str(tmp_path / "hf"), "llama")
    conf, ckpt, img = ["--config", run / "run.toml"], ["--checkpoint", run / "ckpt"], ["--image", tmp_path / "img.png"]
    cases = [
        ([*conf, "--checkpoint", tmp_path / "nope", *img], ["--checkpoint", "nope does not exist"]),
        ([*conf, "--checkpoint", tmp_path, *img], ["holds no complete checkpoint"]),
        ([*conf, *ckpt, "--hf", *img], ["is not an HF export", "language/config.json is missing"]),
        (  # a checkpoint of another model: the model.* key that differs
            [*conf, *ckpt, *img, "--model.language.intermediate_size=96"],
            ["does not fit the configured model", "model.language.intermediate_size (the checkpoint fits 128"],
        ),
        (
            [*conf, "--checkpoint", tmp_path / "hf", *img, "--model.language.intermediate_size=96"],
            ["model.language.intermediate_size=96 vs HF intermediate_size=128"],
        ),
        ([*conf, *ckpt, "--image", tmp_path / "bad.jpg"], ["--image", "bad.jpg: cannot decode image"]),
        ([*conf, *ckpt, "--image", tmp_path / "none.png"], ["--image", "none.png: no such file"]),
        ([*conf, *ckpt, *img, "--audio", tmp_path / "clip.wav"], ["clip.wav: the model has no audio encoder"]),
        (
            [*conf, *ckpt, *img, "--prompt", "one two three " * 16],
            [
                re.compile(r"the prompt needs 56 tokens \(BOS \+ image block 6 \+ text prompt 49\)"),
                "training.seq_len = 48",
            ],
        ),
        (
            [*conf, *ckpt, *img, "--data", tmp_path / "s.tar", "--out", tmp_path / "o"],
            ["give one of --image", "--data SHARD"],
        ),
        ([*conf, *ckpt, "--data", tmp_path / "s.tar"], ["--data needs --out"]),
        ([*conf, *ckpt, "--data", tmp_path / "none.tar", "--out", tmp_path / "o"], ["data.path=", "none.tar"]),
        ([*conf, *ckpt, *img, "--top-p", "1.5"], ["--top-p 1.5"]),
        ([*conf, *ckpt, *img, "--traning.seq_len=9"], ["traning"]),
        ([*ckpt, *img], ["--config"]),
    ]
    if not torch.cuda.is_available():
        cases.append(([*conf, *ckpt, *img, "--device", "cuda"], ["--device cuda", "no CUDA device"]))
    for argv, parts in cases:
        rc, out, err = _run(capsys, *argv)
        assert rc == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        for p in parts:
            assert p.search(err) if isinstance(p, re.Pattern) else p in err, (argv, err)


# ------------------------------------------------------------------------------------------------ learnability
# The first-run recipe, train_configs/shapes_tiny.toml (vision on rank 0, the LM on rank 1; 100 steps of 128 samples),
# on mimo_titan.data.synthetic's coloured shapes. Held-back exact match with learn_shapes(seed) (data and job.seed
# drawn from it), seeds 0-4 of the recipe on 2 colocated ranks: 0.967, 0.989, 0.944, 0.956, 0.889; the shipped
# config (non-colocated) from scripts/make_shapes_data.py's data: 0.933. Chance is 1/9.
SHAPES_CONFIG = ROOT / "train_configs" / "shapes_tiny.toml"


def learn_shapes(tmp_path: Path, seed: int = 0) -> tuple[dict, list[dict]]:
    """Train ``train_configs/shapes_tiny.toml`` (``job.seed = seed``; a training and a held-back shard drawn from
    ``seed``) with torchrun + scripts/train.py, caption the held-back shard with scripts/generate.py, score it with
    scripts/evaluate.py, and return the scores and the JSON lines."""
    from mimo_titan.data.synthetic import write_shapes_shard

    write_shapes_shard(tmp_path / "train.tar", num_samples=2000, seed=2 * seed + 1)
    write_shapes_shard(tmp_path / "heldout.tar", num_samples=90, seed=2 * seed + 2)
    overrides = [
        f"--job.seed={seed}",
        f"--job.output_dir={tmp_path / 'run'}",
        f"--data.path={tmp_path / 'train.tar'}",
        f"--validation.data.path={tmp_path / 'heldout.tar'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def run(*argv: str) -> str:
        out = subprocess.run(list(argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout + out.stderr

    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    log = run(*launch, "scripts/train.py", "--config", str(SHAPES_CONFIG), *overrides)
    val = [float(x) for x in re.findall(r"validation \| step +\d+ \| loss ([0-9.]+)", log)]
    assert len(val) == 4 and val[-1] < 0.5 * val[0], val  # every 25 steps, falling
    captions = tmp_path / "captions.jsonl"
    checkpoint = str(tmp_path / "run" / "checkpoint")
    # generate.py and evaluate.py: their main() in this process (the commands' own code, without a new interpreter
    # importing torch again)
    generate = ["--config", str(SHAPES_CONFIG), *overrides[2:], "--checkpoint", checkpoint]
    assert generate_script.main([*generate, "--data", str(tmp_path / "heldout.tar"), "--out", str(captions)]) == 0
    assert evaluate_script.main([str(captions), "--json", str(tmp_path / "scores.json")]) == 0
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    assert len(rows) == 90
    return json.loads((tmp_path / "scores.json").read_text()), rows


@pytest.mark.multirank
def test_a_tiny_model_trained_by_the_launcher_learns_to_caption_shapes(tmp_path):
    """Colour x shape captions (9 classes, chance 1/9) of random held-back images, through the first-run guide's
    commands (train_configs/shapes_tiny.toml, scripts/train.py, generate.py, evaluate.py): the exact-match accuracy
    must be far above chance, and it is what the test counts itself."""
    scores, rows = learn_shapes(tmp_path)

    def norm(text):
        return " ".join((text or "").lower().split())

    accuracy = sum(norm(r["reference"]) == norm(r["generated"]) for r in rows) / len(rows)
    assert scores["exact_match"] == pytest.approx(accuracy) and scores["samples"] == 90
    assert accuracy >= 0.7, (accuracy, rows[:9])
