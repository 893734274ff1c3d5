"""Measured module costs (scripts/profile_modules.py, mimo_titan.planning.profile): the cost file's format and FLOPs
(checked against counts taken from the built modules, not from mimo_titan.train.flops), the fingerprint, and
load_costs' errors."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from _tiny import config_toml, tiny_config_dict
from mimo_titan.config import config_from_dict
from mimo_titan.errors import ConfigError
from mimo_titan.planning.profile import config_fingerprint, fingerprint_fields, load_costs, profile_modules

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("profile_modules_script", ROOT / "scripts" / "profile_modules.py")
assert _SPEC is not None and _SPEC.loader is not None
script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(script)

CPU = torch.device("cpu")
AUDIO = {
    "type": "audio",
    "num_mel_bins": 8,
    "hidden_size": 16,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 32,
    "max_source_positions": 12,
    "pool": 5,
    "projector_intermediate_size": 32,
}


def _dict(**sections) -> dict:
    """The tiny vision + audio + language config (every module on its own rank)."""
    d = tiny_config_dict({"rank_offset": 0, "num_ranks": 1}, {"rank_offset": 2, "num_ranks": 1}, **sections)
    d["model"] = {"vision": d["model"]["vision"], "audio": dict(AUDIO), "language": d["model"]["language"]}
    d["parallelism"]["audio"] = {"rank_offset": 1, "num_ranks": 1}
    return d


@pytest.fixture(scope="module")
def costs() -> dict:
    return profile_modules(config_from_dict(_dict()), device=CPU, samples=(1,), repeats=1, warmup=0)


# ------------------------------------------------------------------------------------- FLOPs counted independently
def _expected_flops(cfg, name: str, samples: int, seq_len: int) -> float:
    """Training FLOPs (6 per weight and token, 12 · heads · head_dim · T per attention layer and token) from the
    parameters of the module built on the meta device."""
    from mimo_titan.models.decoder import DecoderLM
    from mimo_titan.models.specs import encoder_spec

    section = cfg.model.modules[name]
    lm_hidden = cfg.model.language.hidden_size
    with torch.device("meta"):
        if section.type == "decoder":
            module = DecoderLM(section)
        else:
            module = encoder_spec(section.type).build(section, lm_hidden)
    params = dict(module.named_parameters())
    items = samples * cfg.data.max_images_per_sample
    if section.type == "decoder":
        moe = section.moe
        weights = sum(
            p.numel() * (moe.top_k / moe.num_experts if ".experts." in n else 1)  # a token uses top_k experts
            for n, p in params.items()
            if n != "model.embed_tokens.weight"
        )
        hd = section.head_dim or section.hidden_size // section.num_heads
        attention = 12 * section.num_layers * section.num_heads * hd * seq_len
        return samples * seq_len * (6 * weights + attention)
    if section.type == "vit":
        patches = (section.image_size // section.patch_size) ** 2
        weights = sum(p.numel() for n, p in params.items() if "position_embedding" not in n)
        attention = 12 * section.num_layers * section.hidden_size * patches
        return items * patches * (6 * weights + attention)
    frames = 2 * section.max_source_positions
    s = (frames + 1) // 2
    conv1 = sum(p.numel() for n, p in params.items() if n.startswith("encoder.conv1."))
    proj = sum(p.numel() for n, p in params.items() if n.startswith("projector."))
    rest = sum(p.numel() for p in params.values()) - conv1 - proj
    attention = 12 * section.num_layers * section.hidden_size * s * s
    return items * (6 * (conv1 * frames + rest * s + proj * math.ceil(s / section.pool)) + attention)


def test_script_writes_the_cost_file_with_times_and_flops(tmp_path, capsys):
    toml, out = tmp_path / "tiny.toml", tmp_path / "costs.json"
    toml.write_text(config_toml(_dict()))
    rc = script.main(["--config", str(toml), "--json", str(out), "--device", "cpu", "--samples", "1,2",
                      "--layers", "1", "--repeats", "1", "--warmup", "0", "--training.seq_len=40"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["format"] == 1 and data["device"] == "cpu" and data["dtype"] == "float32"
    assert data["torch"] == torch.__version__
    assert list(data["modules"]) == ["vision", "audio", "language"]
    # --layers 1: every module profiled with one layer; the FLOPs are those of the one-layer modules
    one = config_from_dict(_dict(), [f"--model.{n}.num_layers=1" for n in ("vision", "audio", "language")])
    for name, m in data["modules"].items():
        assert m["num_layers"] == 1 and m["fingerprint"] == config_fingerprint(one, name)
        assert [p["samples"] for p in m["points"]] == [1, 2]
        for p in m["points"]:
            assert p["forward_s"] > 0 and p["backward_s"] > 0
            assert p["train_flops"] == pytest.approx(_expected_flops(one, name, p["samples"], 40), rel=1e-12)
        rows = [line.split() for line in printed.splitlines() if line.startswith(name + " ")]
        assert [int(r[3]) for r in rows] == [1, 2]
        for r, p in zip(rows, m["points"]):  # TFLOP/s column = FLOPs / (forward + backward)
            seconds = p["forward_s"] + p["backward_s"]
            assert float(r[6]) == pytest.approx(p["train_flops"] / seconds / 1e12, abs=6e-4)
    assert data["modules"]["language"]["seq_len"] == 40
    assert data["modules"]["vision"]["seq_len"] == (32 // 16) ** 2
    assert data["modules"]["audio"]["seq_len"] == AUDIO["max_source_positions"]
    assert load_costs(out, one) == data


def test_layers_keep_a_moe_layer_and_the_other_shapes():
    moe = {"num_experts": 4, "top_k": 2, "intermediate_size": 32, "first_layer": 1}
    d = _dict(model={"language": {"num_layers": 3, "moe": moe}})
    cfg = config_from_dict(d)
    with pytest.raises(ConfigError, match=r"--layers 1 leaves model.language without a MoE layer.*--layers 2"):
        profile_modules(cfg, device=CPU, samples=(1,), layers=1, repeats=1, warmup=0)
    out = profile_modules(cfg, device=CPU, samples=(2,), seq_len=16, layers=2, repeats=1, warmup=0)
    lm = out["modules"]["language"]
    assert lm["num_layers"] == 2 and lm["moe_layers"] == 1 and lm["seq_len"] == 16
    assert lm["fingerprint"] == config_fingerprint(cfg, "language")  # num_layers is not in it
    two = config_from_dict(d, ["--model.language.num_layers=2"])
    assert lm["points"][0]["train_flops"] == pytest.approx(_expected_flops(two, "language", 2, 16), rel=1e-12)
    assert lm["points"][0]["train_flops"] < _expected_flops(cfg, "language", 2, 16)


# --------------------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_ignores_order_and_cost_free_fields_but_not_shapes():
    base = config_from_dict(_dict())
    d = _dict()
    d["model"]["language"] = dict(reversed(list(d["model"]["language"].items())))
    unrelated = [
        "--model.language.num_layers=7",
        "--model.language.rms_norm_eps=1e-5",
        "--model.language.rope_theta=500000",
        "--model.language.frozen=true",
        "--model.vision.image_mean=0.5,0.5,0.5",
        "--model.vision.frozen=true",
        "--model.audio.prefetch_microbatches=4",
        "--training.seq_len=96",
        "--optimizer.lr=0.5",
    ]
    other = config_from_dict(d, unrelated)
    for name in ("vision", "audio", "language"):
        assert config_fingerprint(other, name) == config_fingerprint(base, name)
    wider = config_from_dict(_dict(), ["--model.language.hidden_size=128"])
    assert config_fingerprint(wider, "language") != config_fingerprint(base, "language")
    assert config_fingerprint(wider, "vision") != config_fingerprint(base, "vision")  # its projector's output
    assert fingerprint_fields(wider, "vision")["lm_hidden_size"] == 128
    vocab = config_from_dict(_dict(), ["--model.language.vocab_size=4096"])
    assert config_fingerprint(vocab, "language") != config_fingerprint(base, "language")
    assert config_fingerprint(vocab, "vision") == config_fingerprint(base, "vision")


# ----------------------------------------------------------------------------------------------- load_costs errors
def _write(tmp_path, data) -> Path:
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_load_costs_names_the_differing_field_with_both_values(tmp_path, costs):
    path = _write(tmp_path, costs)
    cfg = config_from_dict(_dict(), ["--model.language.hidden_size=128"])
    with pytest.raises(ConfigError) as err:
        load_costs(path, cfg)
    msg = str(err.value)
    assert "model.language.hidden_size is 64 in the file, 128 in the config" in msg
    assert f"re-run `python scripts/profile_modules.py --config CFG.toml --json {path}`" in msg
    assert load_costs(path, config_from_dict(_dict())) == costs


@pytest.mark.parametrize(
    "breakage, match",
    [
        ("no module", r"has no module 'language' \(it holds: vision, audio\)"),
        ("bad json", r"is not valid JSON"),
        ("format", r"has format 2, but this version reads format 1"),
        ("no points", r"modules.audio.points is not a non-empty list"),
        ("missing file", r"does not exist"),
    ],
)
def test_load_costs_refuses_a_broken_file(tmp_path, costs, breakage, match):
    data = copy.deepcopy(costs)
    if breakage == "no module":
        del data["modules"]["language"]
    elif breakage == "format":
        data["format"] = 2
    elif breakage == "no points":
        data["modules"]["audio"]["points"] = []
    path = _write(tmp_path, "{not json" if breakage == "bad json" else data)
    if breakage == "missing file":
        path = tmp_path / "absent.json"
    with pytest.raises(ConfigError, match=match) as err:
        load_costs(path, config_from_dict(_dict()))
    assert "re-run `python scripts/profile_modules.py" in str(err.value)


def test_load_costs_never_suggests_overwriting_a_file_that_is_not_json(tmp_path):
    """A config passed as --costs by mistake: the message says what --costs takes and names a new file to write."""
    toml = tmp_path / "run.toml"
    toml.write_text("[job]\nname = 'x'\n")
    with pytest.raises(ConfigError, match=r"--costs takes the JSON file that scripts/profile_modules\.py") as err:
        load_costs(toml, config_from_dict(_dict()))
    assert "--json costs.json" in str(err.value) and f"--json {toml}" not in str(err.value)


def test_load_costs_refuses_another_compute_dtype(tmp_path, costs):
    path = _write(tmp_path, costs)
    cfg = config_from_dict(_dict(), ["--parallelism.mixed_precision_param=bfloat16"])
    with pytest.raises(ConfigError, match=r"measured in float32 on cpu.*mixed_precision_param = 'bfloat16'.*bfloat16"):
        load_costs(path, cfg)


# -------------------------------------------------------------------------------------------- command-line errors
@pytest.mark.parametrize(
    "extra, match",
    [
        (["--device", "gpu"], "--device 'gpu'"),
        (["--layers", "0"], "--layers 0"),
        (["--samples", "1,x"], "--samples '1,x'"),
        (["--samples", "0"], "--samples [0]"),
        (["--model.language.hidden_sise=8"], "hidden_sise"),
        (["--device", "cuda"], "no CUDA device"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, extra, match):
    if extra == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    toml, out = tmp_path / "tiny.toml", tmp_path / "costs.json"
    toml.write_text(config_toml(_dict()))
    rc = script.main(["--config", str(toml), "--json", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err
