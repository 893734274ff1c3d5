"""``scripts/train.py --help`` lists every config key of the schema (mimo_titan.config_help), and the resolved config
saved next to the checkpoints (mimo_titan.config.save_config) loads back to an equal Config."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from mimo_titan.config import (
    MODEL_TYPES,
    Config,
    ConfigError,
    ModuleParallelism,
    config_from_dict,
    load_config,
    parse_args,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "train_configs").glob("*.toml"))


def _shown(value) -> str:
    """A default as the help writes it (TOML / override spelling)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return repr(value)


def _expected_tables() -> list[tuple[str, dict[str, dataclasses.Field]]]:
    """``(header start, {dotted key: field})`` for every table of the schema, walked here independently of the help
    generator: Config's sections, one [model.<name>] per MODEL_TYPES entry and [parallelism.<name>]."""
    out: list[tuple[str, dict[str, dataclasses.Field]]] = []

    def walk(cls, path, header, sub_header=""):
        hints = typing.get_type_hints(cls)
        leaves = {}
        for f in dataclasses.fields(cls):
            if f.name == "modules":  # the [<section>.<name>] tables: expanded below
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{path}.{f.name}", f"[{path}.{f.name}]{sub_header}", sub_header)
            else:
                leaves[f"{path}.{f.name}"] = f
        if leaves:
            out.append((header, leaves))

    for f in dataclasses.fields(Config):
        walk(typing.get_type_hints(Config)[f.name], f.name, f"[{f.name}]")
    for kind, cls in MODEL_TYPES.items():
        walk(cls, "model.<name>", f'[model.<name>] of type "{kind}"', f' of a "{kind}" module')
    walk(ModuleParallelism, "parallelism.<name>", "[parallelism.<name>]")
    return out


def _help_tables(text: str) -> list[tuple[str, dict[str, str]]]:
    """The help's tables: each ``[...]`` header line and its indented ``key  description`` lines."""
    tables: list[tuple[str, dict[str, str]]] = []
    for line in text.splitlines():
        if line.startswith("["):
            tables.append((line, {}))
        elif line.startswith("  ") and tables:
            key, _, rest = line.strip().partition(" ")
            tables[-1][1][key] = rest.strip()
    return tables


def test_help_lists_every_key_with_its_type_default_and_allowed_values(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: train.py --config PATH [--section.key=VALUE | --section.key VALUE ...]\n")
    shown = _help_tables(text)
    expected = _expected_tables()
    # one table each (the two moe tables, of "vit" and "decoder" modules, are separate ones)
    assert len(shown) == len(expected) == 18  # [validation] and [validation.data] included
    for want_header, fields in expected:
        (header, keys), *more = [t for t in shown if t[0] == want_header or t[0].startswith(want_header + " ")]
        assert not more, want_header
        assert list(keys) == list(fields), header  # every leaf, in schema order, nothing else
        for key, f in fields.items():
            desc = keys[key]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                assert ", required" in desc, (key, desc)
            else:
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                assert f"= {_shown(default)}" in desc, (key, desc)
            for choice in f.metadata.get("choices", ()):
                assert f'"{choice}"' in desc, (key, desc)
            for name, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                if name in f.metadata:
                    assert f"{sym} {f.metadata[name]}" in desc, (key, desc)


def test_train_script_help_exits_0_and_other_scripts_point_to_it():
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "  model.<name>.moe.top_k " in proc.stdout and "  parallelism.<name>.dp_shard " in proc.stdout
    plan = subprocess.run(
        [sys.executable, "scripts/plan.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert plan.returncode == 0 and "scripts/train.py --help` lists every key" in " ".join(plan.stdout.split())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_a_saved_config_loads_back_equal(path, tmp_path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg
    assert not (tmp_path / "config.json.tmp").exists()


def test_a_saved_config_keeps_unset_keys_and_takes_overrides(tmp_path):
    """Keys whose value is none (training.steps with a samples budget, head_dim, peak_tflops) and a list data.path
    survive the JSON round trip; overrides apply on top of a config.json as on a TOML file."""
    d = load_config(SHIPPED[0]).to_dict()
    del d["training"]["steps"]
    d["training"]["samples"] = 40
    d["data"]["path"] = ["a.tar", "b.tar"]
    cfg = config_from_dict(d)
    save_config(cfg, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["training"]["steps"] is None and saved["metrics"]["peak_tflops"] is None
    back = load_config(tmp_path / "config.json")
    assert back == cfg and back.training.steps is None and back.training.samples == 40
    assert back.model.language.head_dim is None and back.data.path == ["a.tar", "b.tar"]
    assert load_config(tmp_path / "config.json", ["--optimizer.lr=5e-4"]).optimizer.lr == 5e-4


def test_a_bad_json_config_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text('{"job": {"name": "x"},}')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"job": {"nme": "x"}}')
    with pytest.raises(ConfigError, match=r"unknown key 'job.nme'"):
        load_config(tmp_path / "config.json")
    with pytest.raises(ConfigError, match=r"is a directory; pass a \.toml file or a config\.json \(a checkpoint"):
        load_config(tmp_path)
