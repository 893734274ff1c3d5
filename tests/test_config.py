"""Tests for mimo_titan.config: TOML loading, defaults, overrides and errors."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from mimo_titan.config import (
    IMAGE_NORMALIZATION,
    MODEL_TYPES,
    Config,
    ConfigError,
    DataConfig,
    LanguageModelConfig,
    ModuleParallelism,
    MoEConfig,
    OptimizerConfig,
    VisionModelConfig,
    config_from_dict,
    load_config,
    parse_args,
)

FULL_TOML = """\
[job]
name = "tiny"
seed = 7
output_dir = "/tmp/out"

[model.vision]
image_size = 32
patch_size = 8
num_channels = 3
hidden_size = 64
num_layers = 2
num_heads = 4
intermediate_size = 128
norm_eps = 1e-5
projector_intermediate_size = 96

[model.language]
vocab_size = 1000
hidden_size = 128
intermediate_size = 256
num_layers = 4
num_heads = 8
num_kv_heads = 2
head_dim = 16
rope_theta = 500000
rms_norm_eps = 1e-5
tie_word_embeddings = true

[parallelism]
pipeline_schedule = "GPipe"
mixed_precision_param = "bfloat16"
mixed_precision_reduce = "bfloat16"

[parallelism.vision]
rank_offset = 0
num_ranks = 2
dp_shard = 2

[parallelism.language]
rank_offset = 2
num_ranks = 4
pp = 2
dp_shard = 2
tp = 1

[training]
steps = 10
global_batch_size = 8
microbatches = 2
seq_len = 64
max_grad_norm = 0.5
device = "cpu"

[optimizer]
name = "AdamW"
lr = 3e-4
betas = [0.9, 0.99]
eps = 1e-7
weight_decay = 0.1

[lr_schedule]
warmup_steps = 2
decay = "linear"
min_lr_ratio = 0

[data]
path = "/data/shards"
tokenizer = "/data/tok"
max_images_per_sample = 2
shuffle = false

[metrics]
log_freq = 5
"""

# Only required keys; [job], [lr_schedule], [metrics] omitted entirely.
MINIMAL_TOML = """\
[model.vision]
image_size = 32
patch_size = 8
hidden_size = 64
num_layers = 2
num_heads = 4
intermediate_size = 128
projector_intermediate_size = 96

[model.language]
vocab_size = 1000
hidden_size = 128
intermediate_size = 256
num_layers = 4
num_heads = 8
num_kv_heads = 2

[model.speech]
type = "audio"
hidden_size = 32
num_layers = 1
num_heads = 2
intermediate_size = 64
projector_intermediate_size = 64

[parallelism.vision]
rank_offset = 0
num_ranks = 1

[parallelism.language]
rank_offset = 1
num_ranks = 1

[parallelism.speech]
rank_offset = 2
num_ranks = 1

[training]
steps = 3
global_batch_size = 4
seq_len = 16

[optimizer]
lr = 1e-3

[data]
path = "shards/"
tokenizer = "tok/tokenizer.json"
"""


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    return write(tmp_path, MINIMAL_TOML)


def err(path: Path, *fragments: str) -> str:
    """Regex matching all fragments (escaped) plus the file path, in any order."""
    parts = [*fragments, str(path)]
    return "".join(f"(?=.*{re.escape(p)})" for p in parts)


# --------------------------------------------------------------------------
# Valid configs
# --------------------------------------------------------------------------


def test_full_config_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL_TOML))
    assert isinstance(cfg, Config)
    assert (cfg.job.name, cfg.job.seed, cfg.job.output_dir) == ("tiny", 7, "/tmp/out")

    v = cfg.model.vision
    assert isinstance(v, VisionModelConfig)
    assert (v.image_size, v.patch_size, v.num_channels, v.hidden_size) == (32, 8, 3, 64)
    assert (v.num_layers, v.num_heads, v.intermediate_size) == (2, 4, 128)
    assert v.norm_eps == 1e-5 and v.projector_intermediate_size == 96

    lm = cfg.model.language
    assert isinstance(lm, LanguageModelConfig)
    assert (lm.vocab_size, lm.hidden_size, lm.intermediate_size) == (1000, 128, 256)
    assert (lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.head_dim) == (4, 8, 2, 16)
    # TOML int accepted for a float field and converted
    assert lm.rope_theta == 500000.0 and isinstance(lm.rope_theta, float)
    assert lm.rms_norm_eps == 1e-5 and lm.tie_word_embeddings is True

    par = cfg.parallelism
    assert par.pipeline_schedule == "GPipe"
    assert par.mixed_precision_param == "bfloat16" and par.mixed_precision_reduce == "bfloat16"
    assert isinstance(par.vision, ModuleParallelism)
    assert par.vision == ModuleParallelism(rank_offset=0, num_ranks=2, dp_shard=2)
    assert par.language == ModuleParallelism(rank_offset=2, num_ranks=4, pp=2, dp_shard=2)
    assert (par.language.dp_replicate, par.language.cp, par.language.ep, par.language.etp) == (
        1,
        1,
        1,
        1,
    )

    t = cfg.training
    assert (t.steps, t.global_batch_size, t.microbatches, t.seq_len) == (10, 8, 2, 64)
    assert t.max_grad_norm == 0.5 and t.device == "cpu"

    o = cfg.optimizer
    assert isinstance(o, OptimizerConfig)
    assert o.name == "AdamW" and o.lr == 3e-4 and o.betas == [0.9, 0.99]
    assert o.eps == 1e-7 and o.weight_decay == 0.1

    s = cfg.lr_schedule
    assert (s.warmup_steps, s.decay, s.min_lr_ratio) == (2, "linear", 0.0)
    assert isinstance(s.min_lr_ratio, float)

    d = cfg.data
    assert isinstance(d, DataConfig)
    assert (d.path, d.tokenizer, d.max_images_per_sample, d.shuffle) == (
        "/data/shards",
        "/data/tok",
        2,
        False,
    )
    assert cfg.metrics.log_freq == 5


def test_minimal_config_uses_defaults(minimal: Path) -> None:
    cfg = load_config(minimal)
    assert (cfg.job.name, cfg.job.seed, cfg.job.output_dir) == ("mimo", 0, "outputs")
    assert cfg.model.vision.num_channels == 3 and cfg.model.vision.norm_eps == 1e-6
    lm = cfg.model.language
    assert lm.head_dim is None and lm.rope_theta == 10000.0
    assert lm.rms_norm_eps == 1e-6 and lm.tie_word_embeddings is False
    par = cfg.parallelism
    assert (par.pipeline_schedule, par.mixed_precision_param, par.mixed_precision_reduce) == (
        "1F1B",
        "auto",
        "float32",
    )
    assert par.vision == ModuleParallelism(rank_offset=0, num_ranks=1)
    assert (par.vision.pp, par.vision.dp_shard, par.vision.tp) == (1, 1, 1)
    assert cfg.training.microbatches == 1 and cfg.training.max_grad_norm == 1.0
    assert cfg.training.device == "auto"
    o = cfg.optimizer
    assert (o.name, o.lr, o.betas, o.eps, o.weight_decay) == ("AdamW", 1e-3, [0.9, 0.95], 1e-8, 0.0)
    s = cfg.lr_schedule
    assert (s.warmup_steps, s.decay, s.min_lr_ratio) == (0, "cosine", 0.1)
    assert cfg.data.max_images_per_sample == 1 and cfg.data.shuffle is True
    assert cfg.metrics.log_freq == 1
    m = cfg.metrics
    assert (m.jsonl, m.tensorboard, m.tensorboard_dir, m.peak_tflops, m.history_steps) == (
        "metrics.jsonl",
        False,
        "tensorboard",
        None,
        100,
    )


def test_default_list_not_shared(minimal: Path) -> None:
    a, b = load_config(minimal), load_config(minimal)
    a.optimizer.betas.append(1.0)
    assert b.optimizer.betas == [0.9, 0.95]


def test_to_dict_plain_nested(minimal: Path) -> None:
    d = load_config(minimal).to_dict()
    assert type(d) is dict and type(d["model"]["language"]) is dict
    assert d["model"]["language"]["vocab_size"] == 1000
    assert d["parallelism"]["language"]["rank_offset"] == 1
    assert d["optimizer"]["betas"] == [0.9, 0.95]
    assert d["lr_schedule"] == {"warmup_steps": 0, "decay": "cosine", "min_lr_ratio": 0.1}


def test_choices_are_case_insensitive_and_canonicalised(tmp_path: Path) -> None:
    text = edit(FULL_TOML, 'pipeline_schedule = "GPipe"', 'pipeline_schedule = "gpipe"')
    text = edit(text, 'name = "AdamW"', 'name = "adamw"')
    cfg = load_config(write(tmp_path, text))
    assert cfg.parallelism.pipeline_schedule == "GPipe"
    assert cfg.optimizer.name == "AdamW"


# --------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------


def test_override_equals_form(minimal: Path) -> None:
    cfg = load_config(minimal, ["--training.steps=42", "--job.name=run-a=b"])
    assert cfg.training.steps == 42
    assert cfg.job.name == "run-a=b"  # only the first '=' splits


def test_override_two_token_form(minimal: Path) -> None:
    cfg = load_config(minimal, ["--optimizer.lr", "2e-4", "--job.seed", "-3", "--training.seq_len=32"])
    assert cfg.optimizer.lr == 2e-4
    assert cfg.job.seed == -3  # a value that starts with '-' is still a value
    assert cfg.training.seq_len == 32


def test_override_nested_parallelism(minimal: Path) -> None:
    cfg = load_config(minimal, ["--parallelism.language.dp_shard=4", "--parallelism.vision.tp", "2"])
    assert cfg.parallelism.language.dp_shard == 4
    assert cfg.parallelism.vision.tp == 2
    assert cfg.parallelism.language.rank_offset == 1  # untouched


def test_override_creates_omitted_section(minimal: Path) -> None:
    cfg = load_config(minimal, ["--lr_schedule.warmup_steps=2", "--metrics.log_freq=3"])
    assert cfg.lr_schedule.warmup_steps == 2 and cfg.lr_schedule.decay == "cosine"
    assert cfg.metrics.log_freq == 3


@pytest.mark.parametrize(
    "text,expected",
    [("true", True), ("False", False), ("1", True), ("0", False), ("TRUE", True)],
)
def test_override_bool(minimal: Path, text: str, expected: bool) -> None:
    cfg = load_config(minimal, [f"--data.shuffle={text}"])
    assert cfg.data.shuffle is expected


def test_override_float_accepts_int_and_list(minimal: Path) -> None:
    cfg = load_config(minimal, ["--optimizer.lr=1", "--optimizer.betas=0.8, 0.99"])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.betas == [0.8, 0.99]
    cfg = load_config(minimal, ["--optimizer.betas", "[0.5,0.6]"])
    assert cfg.optimizer.betas == [0.5, 0.6]


def test_override_optional_int(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML)
    assert load_config(path).model.language.head_dim == 16
    assert load_config(path, ["--model.language.head_dim=none"]).model.language.head_dim is None
    assert load_config(path, ["--model.language.head_dim", "None"]).model.language.head_dim is None
    assert load_config(path, ["--model.language.head_dim=32"]).model.language.head_dim == 32


def test_override_replaces_bad_file_value(tmp_path: Path) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, "steps = 3", 'steps = "ten"'))
    assert load_config(path, ["--training.steps=10"]).training.steps == 10


def test_later_override_wins(minimal: Path) -> None:
    cfg = load_config(minimal, ["--training.steps=5", "--training.steps", "6"])
    assert cfg.training.steps == 6


def test_parse_args(minimal: Path) -> None:
    cfg = parse_args(["--training.steps", "9", "--config", str(minimal), "--data.shuffle=false"])
    assert cfg.training.steps == 9 and cfg.data.shuffle is False
    cfg = parse_args([f"--config={minimal}", "--optimizer.betas=0.9,0.9"])
    assert cfg.optimizer.betas == [0.9, 0.9]
    assert cfg.training.steps == 3


def test_parse_args_requires_config() -> None:
    with pytest.raises(ConfigError, match="--config"):
        parse_args(["--training.steps=3"])


def test_parse_args_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    assert "--config PATH" in capsys.readouterr().out


def test_config_from_dict_does_not_mutate_input(minimal: Path) -> None:
    import tomli

    data = tomli.loads(MINIMAL_TOML)
    cfg = config_from_dict(data, ["--training.steps=8"])
    assert cfg.training.steps == 8
    assert data["training"]["steps"] == 3


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=err(path, "does not exist")):
        load_config(path)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[training\nsteps = 1\n")
    with pytest.raises(ConfigError, match=err(path, "not valid TOML")):
        load_config(path)


def test_unknown_key_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, "steps = 3", "stepz = 3"))
    with pytest.raises(
        ConfigError,
        match=err(path, "unknown key 'training.stepz'", "did you mean 'training.steps'?"),
    ):
        load_config(path)


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TOML + "\n[metrics]\nqqqqqq = 1\n")
    with pytest.raises(ConfigError, match=err(path, "unknown key 'metrics.qqqqqq'", "'metrics.log_freq'")):
        load_config(path)


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TOML + "\n[trainer]\nsteps = 1\n")
    with pytest.raises(ConfigError, match=err(path, "unknown key 'trainer'", "did you mean 'training'?")):
        load_config(path)


def test_wrong_type_string_for_int(tmp_path: Path) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, "steps = 3", 'steps = "ten"'))
    with pytest.raises(ConfigError, match=err(path, "'training.steps'", "expected int", "'ten'")):
        load_config(path)


def test_bool_rejected_for_int(tmp_path: Path) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, "steps = 3", "steps = true"))
    with pytest.raises(ConfigError, match=err(path, "'training.steps'", "expected int", "bool True")):
        load_config(path)


def test_float_rejected_for_int(tmp_path: Path) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, "seq_len = 16", "seq_len = 16.0"))
    with pytest.raises(ConfigError, match=err(path, "'training.seq_len'", "expected int", "16.0")):
        load_config(path)


def test_table_where_scalar_expected(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TOML + "\n[job.seed]\nvalue = 1\n")
    with pytest.raises(ConfigError, match=err(path, "'job.seed'", "expected int", "table")):
        load_config(path)


def test_scalar_where_table_expected(tmp_path: Path) -> None:
    path = write(tmp_path, "metrics = 3\n" + MINIMAL_TOML)
    with pytest.raises(ConfigError, match=err(path, "'metrics'", "expected table", "int 3")):
        load_config(path)


def test_wrong_list_element_type(tmp_path: Path) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, "lr = 1e-3", 'lr = 1e-3\nbetas = [0.9, "x"]'))
    with pytest.raises(ConfigError, match=err(path, "'optimizer.betas'", "expected list of float")):
        load_config(path)


def test_missing_required_key(tmp_path: Path) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, "vocab_size = 1000\n", ""))
    with pytest.raises(ConfigError, match=err(path, "missing required key 'model.language.vocab_size'")):
        load_config(path)


def test_missing_required_section(tmp_path: Path) -> None:
    text = edit(MINIMAL_TOML, '[data]\npath = "shards/"\ntokenizer = "tok/tokenizer.json"\n', "")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=err(path, "missing required section 'data'", "[data]")):
        load_config(path)


@pytest.mark.parametrize(
    "old,new,key,bad",
    [
        ("lr = 1e-3", 'lr = 1e-3\nname = "SGD"', "optimizer.name", "'SGD'"),
        ("seq_len = 16", 'seq_len = 16\ndevice = "tpu"', "training.device", "'tpu'"),
        (
            "[parallelism.vision]",
            '[parallelism]\npipeline_schedule = "Interleaved"\n[parallelism.vision]',
            "parallelism.pipeline_schedule",
            "'Interleaved'",
        ),
        (
            "[parallelism.vision]",
            '[parallelism]\nmixed_precision_param = "fp8"\n[parallelism.vision]',
            "parallelism.mixed_precision_param",
            "'fp8'",
        ),
        (
            "[parallelism.vision]",
            '[parallelism]\nmixed_precision_reduce = "float16"\n[parallelism.vision]',
            "parallelism.mixed_precision_reduce",
            "'float16'",
        ),
    ],
)
def test_value_not_allowed(tmp_path: Path, old: str, new: str, key: str, bad: str) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, old, new))
    with pytest.raises(ConfigError, match=err(path, f"'{key}'", bad, "use one of")):
        load_config(path)


def test_decay_not_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TOML + '\n[lr_schedule]\ndecay = "step"\n')
    with pytest.raises(ConfigError, match=err(path, "'lr_schedule.decay'", "'cosine', 'linear', 'constant'")):
        load_config(path)


@pytest.mark.parametrize(
    "override,key,bound",
    [
        ("--training.steps=0", "training.steps", ">= 1"),
        ("--training.global_batch_size=0", "training.global_batch_size", ">= 1"),
        ("--training.microbatches=0", "training.microbatches", ">= 1"),
        ("--training.seq_len=1", "training.seq_len", ">= 2"),
        ("--optimizer.lr=0", "optimizer.lr", "> 0"),
        ("--lr_schedule.warmup_steps=-1", "lr_schedule.warmup_steps", ">= 0"),
        ("--lr_schedule.min_lr_ratio=1.5", "lr_schedule.min_lr_ratio", "<= 1"),
        ("--lr_schedule.min_lr_ratio=-0.1", "lr_schedule.min_lr_ratio", ">= 0"),
        ("--data.max_images_per_sample=0", "data.max_images_per_sample", ">= 1"),
        ("--metrics.log_freq=0", "metrics.log_freq", ">= 1"),
        ("--metrics.peak_tflops=0", "metrics.peak_tflops", "> 0"),
        ("--metrics.history_steps=0", "metrics.history_steps", ">= 1"),
    ],
)
def test_range_checks(minimal: Path, override: str, key: str, bound: str) -> None:
    with pytest.raises(ConfigError, match=err(minimal, f"'{key}'", bound, override)):
        load_config(minimal, [override])


def test_metrics_keys(minimal: Path) -> None:
    cfg = load_config(minimal, ["--metrics.peak_tflops=989.5", "--metrics.jsonl=", "--metrics.tensorboard=true"])
    assert (cfg.metrics.peak_tflops, cfg.metrics.jsonl, cfg.metrics.tensorboard) == (989.5, "", True)
    assert load_config(minimal, ["--metrics.peak_tflops=none"]).metrics.peak_tflops is None
    override = "--metrics.tensorboard_dir="
    with pytest.raises(ConfigError, match=err(minimal, "'metrics.tensorboard_dir'", "needs a folder", override)):
        load_config(minimal, ["--metrics.tensorboard=true", override])


def test_range_check_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, "steps = 3", "steps = 0"))
    with pytest.raises(ConfigError, match=err(path, "'training.steps'", ">= 1")):
        load_config(path)


def test_betas_length(tmp_path: Path) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, "lr = 1e-3", "lr = 1e-3\nbetas = [0.9]"))
    with pytest.raises(ConfigError, match=err(path, "'optimizer.betas'", "exactly 2")):
        load_config(path)


def test_override_unknown_key(minimal: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=err(minimal, "--training.stepz=3", "'training.stepz'", "did you mean 'training.steps'?"),
    ):
        load_config(minimal, ["--training.stepz=3"])


@pytest.mark.parametrize(
    "key,suggestion",
    [
        ("training.lr", "did you mean 'optimizer.lr'?"),
        ("training.lrr", "did you mean 'optimizer.lr'?"),
        ("training.eps", "did you mean 'optimizer.eps'?"),
        ("optimizer.warmup_steps", "did you mean 'lr_schedule.warmup_steps'?"),
        ("trainng.steps", "did you mean 'training'?"),
    ],
)
def test_override_unknown_key_cross_section_suggestion(minimal: Path, key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=err(minimal, f"'{key}'", suggestion)):
        load_config(minimal, [f"--{key}=3"])


def test_override_unknown_nested_key(minimal: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=err(minimal, "'parallelism.language.dp_shrd'", "'parallelism.language.dp_shard'"),
    ):
        load_config(minimal, ["--parallelism.language.dp_shrd", "2"])


def test_override_below_leaf(minimal: Path) -> None:
    with pytest.raises(ConfigError, match=err(minimal, "'training.steps.x'", "not a section")):
        load_config(minimal, ["--training.steps.x=1"])


def test_override_targets_section(minimal: Path) -> None:
    with pytest.raises(ConfigError, match=err(minimal, "--training=3", "section 'training'")):
        load_config(minimal, ["--training=3"])


@pytest.mark.parametrize(
    "override,key,expected",
    [
        ("--training.steps=ten", "training.steps", "expected int"),
        ("--training.steps=1.5", "training.steps", "expected int"),
        ("--data.shuffle=maybe", "data.shuffle", "expected bool"),
        ("--optimizer.lr=fast", "optimizer.lr", "expected float"),
        ("--optimizer.betas=0.9,x", "optimizer.betas", "expected list of float"),
        ("--model.language.head_dim=auto", "model.language.head_dim", "expected int or none"),
    ],
)
def test_override_unparsable_value(minimal: Path, override: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=err(minimal, override, f"'{key}'", expected)):
        load_config(minimal, [override])


def test_override_missing_value(minimal: Path) -> None:
    with pytest.raises(ConfigError, match=err(minimal, "'--training.steps'", "no value")):
        load_config(minimal, ["--training.steps"])
    with pytest.raises(ConfigError, match=err(minimal, "'--training.steps'", "no value")):
        load_config(minimal, ["--training.steps", "--data.shuffle=0"])


def test_override_bad_syntax(minimal: Path) -> None:
    with pytest.raises(ConfigError, match=err(minimal, "'training.steps=3'", "--section.key=value")):
        load_config(minimal, ["training.steps=3"])


def test_override_betas_length(minimal: Path) -> None:
    with pytest.raises(ConfigError, match=err(minimal, "'optimizer.betas'", "exactly 2")):
        load_config(minimal, ["--optimizer.betas=0.9,0.95,0.99"])


# --------------------------------------------------------------------------
# MoE ([model.vision.moe] / [model.language.moe])
# --------------------------------------------------------------------------

LM_MOE = """
[model.language.moe]
num_experts = 8
top_k = 2
intermediate_size = 64
layer_freq = 2
first_layer = 1
score_func = "Sigmoid"
norm_topk_prob = false
shared_expert_intermediate_size = 32
load_balance = "AUX_FREE"
aux_loss_coeff = 0
bias_update_rate = 0.01
"""


def test_moe_defaults_dense(minimal: Path) -> None:
    cfg = load_config(minimal)
    for moe in (cfg.model.vision.moe, cfg.model.language.moe):
        assert moe == MoEConfig()
        assert (moe.num_experts, moe.top_k, moe.intermediate_size) == (0, 2, 0)
        assert (moe.layer_freq, moe.first_layer, moe.score_func, moe.norm_topk_prob) == (
            1,
            0,
            "softmax",
            True,
        )
        assert moe.shared_expert_intermediate_size == 0
        assert (moe.load_balance, moe.aux_loss_coeff, moe.bias_update_rate) == ("aux_loss", 0.01, 0.001)
        assert not moe.enabled
        assert moe.moe_layers(4) == [] and not moe.is_moe_layer(0)
    # each module gets its own instance
    assert cfg.model.vision.moe is not cfg.model.language.moe
    assert cfg.to_dict()["model"]["language"]["moe"]["num_experts"] == 0


def test_moe_table_parsed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL_TOML + LM_MOE))
    moe = cfg.model.language.moe
    assert isinstance(moe, MoEConfig)
    assert (moe.num_experts, moe.top_k, moe.intermediate_size) == (8, 2, 64)
    assert (moe.layer_freq, moe.first_layer) == (2, 1)
    assert moe.score_func == "sigmoid" and moe.load_balance == "aux_free"  # canonicalised
    assert moe.norm_topk_prob is False and moe.shared_expert_intermediate_size == 32
    assert moe.aux_loss_coeff == 0.0 and isinstance(moe.aux_loss_coeff, float)
    assert moe.bias_update_rate == 0.01
    assert moe.enabled
    # num_layers = 4: layers 1 and 3 are MoE.
    assert [moe.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]
    assert moe.moe_layers(cfg.model.language.num_layers) == [1, 3]
    assert cfg.model.vision.moe == MoEConfig()


def test_moe_is_moe_layer_rule() -> None:
    moe = MoEConfig(num_experts=4, intermediate_size=8, layer_freq=3, first_layer=2)
    expected = [i >= 2 and (i - 2) % 3 == 0 for i in range(12)]
    assert [moe.is_moe_layer(i) for i in range(12)] == expected
    assert moe.moe_layers(12) == [2, 5, 8, 11]
    assert MoEConfig(num_experts=2, intermediate_size=8).moe_layers(3) == [0, 1, 2]
    with pytest.raises(ValueError, match="layer index -1 is negative"):
        moe.is_moe_layer(-1)


def test_moe_overrides(minimal: Path) -> None:
    cfg = load_config(
        minimal,
        [
            "--model.vision.moe.num_experts=4",
            "--model.vision.moe.intermediate_size",
            "32",
            "--model.vision.moe.top_k=4",
            "--model.vision.moe.norm_topk_prob=false",
        ],
    )
    moe = cfg.model.vision.moe
    assert (moe.num_experts, moe.intermediate_size, moe.top_k, moe.norm_topk_prob) == (4, 32, 4, False)
    assert cfg.model.language.moe == MoEConfig()


def test_moe_dense_skips_cross_checks(minimal: Path) -> None:
    # num_experts = 0: top_k > num_experts, intermediate_size = 0 and a huge first_layer are fine.
    cfg = load_config(minimal, ["--model.language.moe.top_k=5", "--model.language.moe.first_layer=100"])
    assert cfg.model.language.moe.top_k == 5 and not cfg.model.language.moe.enabled


@pytest.mark.parametrize(
    "override,key,bound",
    [
        ("--model.language.moe.num_experts=-1", "model.language.moe.num_experts", ">= 0"),
        ("--model.language.moe.top_k=0", "model.language.moe.top_k", ">= 1"),
        ("--model.language.moe.intermediate_size=-4", "model.language.moe.intermediate_size", ">= 0"),
        ("--model.language.moe.layer_freq=0", "model.language.moe.layer_freq", ">= 1"),
        ("--model.vision.moe.first_layer=-1", "model.vision.moe.first_layer", ">= 0"),
        (
            "--model.vision.moe.shared_expert_intermediate_size=-1",
            "model.vision.moe.shared_expert_intermediate_size",
            ">= 0",
        ),
        ("--model.language.moe.aux_loss_coeff=-0.1", "model.language.moe.aux_loss_coeff", ">= 0"),
        ("--model.language.moe.bias_update_rate=-1e-3", "model.language.moe.bias_update_rate", ">= 0"),
    ],
)
def test_moe_range_checks(minimal: Path, override: str, key: str, bound: str) -> None:
    with pytest.raises(ConfigError, match=err(minimal, f"'{key}'", bound, override)):
        load_config(minimal, [override])


@pytest.mark.parametrize(
    "line,key,bad,allowed",
    [
        ('score_func = "relu"', "model.language.moe.score_func", "'relu'", "'softmax', 'sigmoid'"),
        (
            'load_balance = "switch"',
            "model.language.moe.load_balance",
            "'switch'",
            "'aux_loss', 'aux_free', 'none'",
        ),
    ],
)
def test_moe_value_not_allowed(tmp_path: Path, line: str, key: str, bad: str, allowed: str) -> None:
    path = write(tmp_path, MINIMAL_TOML + f"\n[model.language.moe]\n{line}\n")
    with pytest.raises(ConfigError, match=err(path, f"'{key}'", bad, "use one of", allowed)):
        load_config(path)


def test_moe_top_k_above_num_experts(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TOML + LM_MOE.replace("top_k = 2", "top_k = 9"))
    with pytest.raises(
        ConfigError,
        match=err(
            path,
            "invalid value 9 for 'model.language.moe.top_k'",
            "top_k must be <= num_experts=8",
            "set 'model.language.moe.top_k' to at most 8 or raise 'model.language.moe.num_experts'",
        ),
    ):
        load_config(path)


def test_moe_top_k_above_num_experts_by_override(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TOML + LM_MOE)
    with pytest.raises(
        ConfigError,
        match=err(path, "'model.language.moe.top_k'", "num_experts=1", "--model.language.moe.top_k=3"),
    ):
        load_config(path, ["--model.language.moe.num_experts=1", "--model.language.moe.top_k=3"])


def test_moe_requires_intermediate_size(minimal: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=err(
            minimal,
            "invalid value 0 for 'model.vision.moe.intermediate_size'",
            "num_experts=4",
            "set 'model.vision.moe.intermediate_size' > 0",
            "'model.vision.moe.num_experts = 0' for a dense module",
        ),
    ):
        load_config(minimal, ["--model.vision.moe.num_experts=4"])


def test_moe_first_layer_past_num_layers(tmp_path: Path) -> None:
    # [model.language] has num_layers = 4.
    path = write(tmp_path, MINIMAL_TOML + LM_MOE.replace("first_layer = 1", "first_layer = 4"))
    with pytest.raises(
        ConfigError,
        match=err(
            path,
            "invalid value 4 for 'model.language.moe.first_layer'",
            "must be < num_layers=4",
            "lower 'model.language.moe.first_layer'",
        ),
    ):
        load_config(path)


def test_moe_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TOML + LM_MOE.replace("top_k = 2", "topk = 2"))
    with pytest.raises(
        ConfigError,
        match=err(path, "unknown key 'model.language.moe.topk'", "did you mean 'model.language.moe.top_k'?"),
    ):
        load_config(path)


def test_moe_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TOML + LM_MOE.replace("num_experts = 8", "num_experts = 8.0"))
    with pytest.raises(ConfigError, match=err(path, "'model.language.moe.num_experts'", "expected int")):
        load_config(path)


# --------------------------------------------------------------------------
# Ranges of every numeric key, and the checks that relate keys
# --------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "train_configs").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.lr_schedule.warmup_steps <= cfg.training.total_steps
    # the overrides the tests and the README use on them stay valid (a production config's warmup needs its own)
    short = ["--training.steps=3"] + (["--lr_schedule.warmup_steps=1"] if cfg.lr_schedule.warmup_steps > 3 else [])
    assert load_config(path, short).training.steps == 3


def test_tests_base_config_loads() -> None:
    from _tiny import BASE, tiny_config_dict

    one = {"rank_offset": 0, "num_ranks": 1}
    cfg = config_from_dict(tiny_config_dict(one, one))
    assert cfg.model.language.hidden_size == BASE["model"]["language"]["hidden_size"]


def test_shipped_configs_found() -> None:
    assert len(SHIPPED) >= 4


def _numeric_keys(cls: type, prefix: str) -> list[tuple[str, object]]:
    """Every dotted key of ``cls`` holding a number or a list of numbers, with its type."""
    out: list[tuple[str, object]] = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(tp):
            out.extend(_numeric_keys(tp, key))
        elif tp in (int, float, int | None, float | None, list[float], list[int]):
            out.append((key, tp))
        else:
            assert tp in (str, bool, list[str], str | list[str]), (
                f"{key}: a field of type {tp} needs a case in this test"
            )
    return out


# the model tables of MINIMAL_TOML, one of each model type
MODEL_SECTIONS = {"vision": MODEL_TYPES["vit"], "language": MODEL_TYPES["decoder"], "speech": MODEL_TYPES["audio"]}
NUMERIC_KEYS = [
    *(kv for name, cls in MODEL_SECTIONS.items() for kv in _numeric_keys(cls, f"model.{name}")),
    *(
        kv
        for section in ("optimizer", "lr_schedule", "training", "data")
        for kv in _numeric_keys(typing.get_type_hints(Config)[section], section)
    ),
]


def test_every_model_type_is_walked() -> None:
    assert set(MODEL_SECTIONS.values()) == set(MODEL_TYPES.values())


def test_numeric_key_walk_finds_the_known_keys() -> None:
    keys = {k for k, _ in NUMERIC_KEYS}
    for known in (
        "model.vision.patch_size",
        "model.language.rope_theta",
        "model.language.head_dim",
        "model.language.moe.aux_loss_coeff",
        "model.vision.moe.top_k",
        "optimizer.betas",
        "optimizer.eps",
        "lr_schedule.min_lr_ratio",
        "training.max_grad_norm",
        "training.samples",
        "data.max_images_per_sample",
    ):
        assert known in keys
    assert len(keys) >= 45


@pytest.mark.parametrize("key,tp", NUMERIC_KEYS, ids=[k for k, _ in NUMERIC_KEYS])
def test_every_numeric_key_rejects_a_negative_value(minimal: Path, key: str, tp: object) -> None:
    """A numeric key added later without a range rule (metadata or a cross-key check) fails here."""
    text = "-1,-1" if tp in (list[float], list[int]) else "-1"
    token = f"--{key}={text}"
    with pytest.raises(ConfigError, match=err(minimal, f"'{key}'", "-1", token)):
        load_config(minimal, [token])


@pytest.mark.parametrize(
    "override,key,shown,rule",
    [
        # [model.vision]
        ("--model.vision.image_size=0", "model.vision.image_size", "value 0", ">= 1"),
        ("--model.vision.patch_size=0", "model.vision.patch_size", "value 0", ">= 1"),
        ("--model.vision.num_channels=0", "model.vision.num_channels", "value 0", ">= 1"),
        ("--model.vision.hidden_size=0", "model.vision.hidden_size", "value 0", ">= 1"),
        ("--model.vision.num_layers=0", "model.vision.num_layers", "value 0", ">= 1"),
        ("--model.vision.num_heads=0", "model.vision.num_heads", "value 0", ">= 1"),
        ("--model.vision.intermediate_size=0", "model.vision.intermediate_size", "value 0", ">= 1"),
        ("--model.vision.norm_eps=0", "model.vision.norm_eps", "value 0.0", "> 0"),
        ("--model.vision.projector_intermediate_size=0", "model.vision.projector_intermediate_size", "value 0", ">= 1"),
        (
            "--model.vision.image_std=0.5,0,0.5",
            "model.vision.image_std",
            "value 0.0 (element 1 of [0.5, 0.0, 0.5])",
            "> 0",
        ),
        (
            "--model.vision.image_mean=0.5,1.5,0.5",
            "model.vision.image_mean",
            "value 1.5 (element 1 of [0.5, 1.5, 0.5])",
            "<= 1",
        ),
        # [model.language]
        ("--model.language.vocab_size=0", "model.language.vocab_size", "value 0", ">= 1"),
        ("--model.language.hidden_size=-256", "model.language.hidden_size", "value -256", ">= 1"),
        ("--model.language.intermediate_size=0", "model.language.intermediate_size", "value 0", ">= 1"),
        ("--model.language.num_layers=0", "model.language.num_layers", "value 0", ">= 1"),
        ("--model.language.num_heads=0", "model.language.num_heads", "value 0", ">= 1"),
        ("--model.language.num_kv_heads=0", "model.language.num_kv_heads", "value 0", ">= 1"),
        ("--model.language.head_dim=0", "model.language.head_dim", "value 0", "or none"),
        ("--model.language.rope_theta=-1", "model.language.rope_theta", "value -1.0", "> 0 (the RoPE base"),
        ("--model.language.rope_theta=0", "model.language.rope_theta", "value 0.0", "> 0"),
        ("--model.language.rms_norm_eps=0", "model.language.rms_norm_eps", "value 0.0", "> 0"),
        # [optimizer]
        ("--optimizer.lr=-1", "optimizer.lr", "value -1.0", "> 0"),
        (
            "--optimizer.betas=1.5,0.9",
            "optimizer.betas",
            "value 1.5 (element 0 of [1.5, 0.9])",
            "each element must be >= 0 and < 1",
        ),
        ("--optimizer.betas=0.9,1", "optimizer.betas", "value 1.0 (element 1 of [0.9, 1.0])", "< 1"),
        ("--optimizer.betas=-0.1,0.9", "optimizer.betas", "value -0.1 (element 0 of [-0.1, 0.9])", ">= 0"),
        ("--optimizer.eps=-1", "optimizer.eps", "value -1.0", "> 0"),
        ("--optimizer.eps=0", "optimizer.eps", "value 0.0", "> 0"),
        ("--optimizer.weight_decay=-0.1", "optimizer.weight_decay", "value -0.1", ">= 0"),
        # [training]
        ("--training.max_grad_norm=-1", "training.max_grad_norm", "value -1.0", ">= 0 (0 disables gradient clipping)"),
        ("--training.samples=0", "training.samples", "value 0", ">= 1"),
        ("--training.max_skipped_steps=0", "training.max_skipped_steps", "value 0", ">= 1"),
        ("--training.collective_timeout_s=0", "training.collective_timeout_s", "value 0.0", ">= 5"),
        ("--training.collective_timeout_s=2", "training.collective_timeout_s", "value 2.0", ">= 5"),
        ("--job.seed=1180591620717411303424", "job.seed", "value 1180591620717411303424", "<= 18446744073709551614"),
        ("--job.seed=-9223372036854775809", "job.seed", "value -9223372036854775809", ">= -9223372036854775808"),
    ],
)
def test_range_of_each_key(minimal: Path, override: str, key: str, shown: str, rule: str) -> None:
    with pytest.raises(ConfigError, match=err(minimal, f"out-of-range {shown} for '{key}'", rule, override)):
        load_config(minimal, [override])


@pytest.mark.parametrize("key", ["image_mean", "image_std"])
def test_image_normalisation_takes_three_values(minimal: Path, key: str) -> None:
    """``model.vision.image_mean`` / ``image_std``: one value per RGB channel; CLIP's by default."""
    token = f"--model.vision.{key}=0.5,0.5"
    with pytest.raises(ConfigError, match=err(minimal, f"wrong length for 'model.vision.{key}'", "exactly 3", token)):
        load_config(minimal, [token])
    v = load_config(minimal, [f"--model.vision.{key}=[0.5, 0.5, 0.5]"]).model.vision
    assert getattr(v, key) == [0.5] * 3
    default = load_config(minimal).model.vision
    assert (default.image_mean, default.image_std) == tuple(list(x) for x in IMAGE_NORMALIZATION["clip"])


def test_range_of_a_key_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, "num_kv_heads = 2", "num_kv_heads = 0"))
    with pytest.raises(ConfigError, match=err(path, "out-of-range value 0 for 'model.language.num_kv_heads'", ">= 1")):
        load_config(path)


@pytest.mark.parametrize(
    "override,key,shown",
    [
        ("--optimizer.lr=nan", "optimizer.lr", "nan"),
        ("--model.language.rope_theta=inf", "model.language.rope_theta", "inf"),
        ("--training.collective_timeout_s=inf", "training.collective_timeout_s", "inf"),
        ("--training.max_grad_norm=inf", "training.max_grad_norm", "inf"),
        ("--optimizer.betas=0.9,nan", "optimizer.betas", "nan (element 1 of [0.9, nan])"),
    ],
)
def test_non_finite_numbers_rejected(minimal: Path, override: str, key: str, shown: str) -> None:
    with pytest.raises(
        ConfigError, match=err(minimal, f"non-finite value {shown} for '{key}'", override, "give a finite number")
    ):
        load_config(minimal, [override])


def test_non_finite_number_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, "lr = 1e-3", "lr = 1e-3\neps = -inf"))
    with pytest.raises(ConfigError, match=err(path, "non-finite value -inf for 'optimizer.eps'")):
        load_config(path)


def test_zero_max_grad_norm_disables_clipping(minimal: Path) -> None:
    assert load_config(minimal, ["--training.max_grad_norm=0"]).training.max_grad_norm == 0.0


def test_language_heads_not_dividing_hidden_size(minimal: Path) -> None:
    # hidden_size = 128: 128 / 3 is no integer (it used to fail later as "head dim (42) must be even").
    with pytest.raises(
        ConfigError,
        match=err(
            minimal,
            "invalid value 128 for 'model.language.hidden_size'",
            "hidden_size=128 is not divisible by num_heads=3, so the head dim would not be an integer",
            "multiple of 2 * num_heads = 6",
            "e.g. 126 or 132",
            "or set 'model.language.head_dim'",
            "'model.language.num_heads' was set by override '--model.language.num_heads=3'",
        ),
    ):
        load_config(minimal, ["--model.language.num_heads=3", "--model.language.num_kv_heads=1"])


def test_language_head_dim_given_avoids_the_split(minimal: Path) -> None:
    cfg = load_config(
        minimal, ["--model.language.num_heads=3", "--model.language.num_kv_heads=1", "--model.language.head_dim=32"]
    )
    assert (cfg.model.language.num_heads, cfg.model.language.head_dim) == (3, 32)


def test_language_derived_head_dim_odd(minimal: Path) -> None:
    # 120 / 8 = 15
    with pytest.raises(
        ConfigError,
        match=err(
            minimal,
            "invalid value 120 for 'model.language.hidden_size'",
            "--model.language.hidden_size=120",
            "hidden_size / num_heads = 120 / 8 = 15 is odd",
            "RoPE",
            "multiple of 2 * num_heads = 16",
            "e.g. 112 or 128",
            "'model.language.head_dim' to an even number",
        ),
    ):
        load_config(minimal, ["--model.language.hidden_size=120"])


def test_language_head_dim_odd(minimal: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=err(
            minimal,
            "invalid value 15 for 'model.language.head_dim'",
            "--model.language.head_dim=15",
            "head_dim=15 is odd",
            "RoPE",
            "even number (e.g. 16)",
        ),
    ):
        load_config(minimal, ["--model.language.head_dim=15"])


@pytest.mark.parametrize("kv", [3, 16])
def test_language_kv_heads_not_dividing_heads(minimal: Path, kv: int) -> None:
    with pytest.raises(
        ConfigError,
        match=err(
            minimal,
            f"invalid value {kv} for 'model.language.num_kv_heads'",
            f"--model.language.num_kv_heads={kv}",
            f"num_heads=8 is not a multiple of num_kv_heads={kv}",
            "grouped-query attention",
            "a divisor of 8 (1, 2, 4, 8)",
        ),
    ):
        load_config(minimal, [f"--model.language.num_kv_heads={kv}"])


def test_vision_heads_not_dividing_hidden_size(tmp_path: Path) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, "hidden_size = 64", "hidden_size = 66"))
    with pytest.raises(
        ConfigError,
        match=err(
            path,
            "invalid value 66 for 'model.vision.hidden_size'",
            "hidden_size=66 is not divisible by num_heads=4",
            "e.g. 64 or 68",
            "change 'model.vision.num_heads'",
        ),
    ):
        load_config(path)


def test_vision_image_smaller_than_a_patch(minimal: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=err(
            minimal,
            "invalid value 4 for 'model.vision.image_size'",
            "--model.vision.image_size=4",
            "image_size=4 is smaller than patch_size=8",
            "holds no patch",
        ),
    ):
        load_config(minimal, ["--model.vision.image_size=4"])


def test_vision_patch_size_not_dividing_the_image_drops_the_border_as_hf(minimal: Path) -> None:
    """SigLIP-so400m/14 at 384 px: the convolution drops the last 384 % 14 = 6 pixel rows and columns, so a 30 px
    image with 8 px patches gives the same tokens as its top-left 24 px."""
    import torch

    from mimo_titan.models.vit import ViT

    vis = load_config(minimal, ["--model.vision.image_size=30"]).model.vision
    torch.manual_seed(0)
    vit = ViT(vis)
    pixels = torch.randn(2, vis.num_channels, 30, 30)
    out = vit(pixels)
    assert out.shape == (2, 9, vis.hidden_size)
    torch.testing.assert_close(out, vit(torch.nn.functional.pad(pixels[..., :24, :24], (0, 6, 0, 6))))


def test_global_batch_not_divisible_by_microbatches(minimal: Path) -> None:
    # global_batch_size = 4
    with pytest.raises(
        ConfigError,
        match=err(
            minimal,
            "invalid value 4 for 'training.global_batch_size'",
            "global_batch_size=4 is not divisible by microbatches=3",
            "a multiple of 3 (e.g. 3 or 6)",
            "'training.microbatches' to a divisor of 4",
            "'training.microbatches' was set by override '--training.microbatches=3'",
        ),
    ):
        load_config(minimal, ["--training.microbatches=3"])


def test_warmup_longer_than_the_run(minimal: Path) -> None:
    # steps = 3
    with pytest.raises(
        ConfigError,
        match=err(
            minimal,
            "invalid value 4 for 'lr_schedule.warmup_steps'",
            "--lr_schedule.warmup_steps=4",
            "longer than the run of 3 optimizer steps (training.steps=3)",
            "set 'lr_schedule.warmup_steps' to at most 3",
        ),
    ):
        load_config(minimal, ["--lr_schedule.warmup_steps=4"])
    assert load_config(minimal, ["--lr_schedule.warmup_steps=3"]).lr_schedule.warmup_steps == 3


def test_warmup_longer_than_a_samples_budget(tmp_path: Path) -> None:
    path = write(tmp_path, edit(MINIMAL_TOML, "steps = 3", "samples = 9") + "\n[lr_schedule]\nwarmup_steps = 4\n")
    with pytest.raises(
        ConfigError,
        match=err(
            path,
            "invalid value 4 for 'lr_schedule.warmup_steps'",
            "run of 3 optimizer steps (training.samples=9 / training.global_batch_size=4, rounded up)",
        ),
    ):
        load_config(path)
    assert load_config(path, ["--training.samples=13"]).training.total_steps == 4


def test_cross_check_names_the_override_of_the_other_key() -> None:
    path = ROOT / "train_configs" / "debug_colocated.toml"  # warmup_steps = 3
    with pytest.raises(
        ConfigError,
        match=err(
            path,
            "invalid value 3 for 'lr_schedule.warmup_steps'",
            "run of 1 optimizer step (",
            "'training.steps' was set by override '--training.steps=1'",
        ),
    ):
        load_config(path, ["--training.steps=1"])


def test_key_ranges_are_reported_before_cross_key_problems(minimal: Path) -> None:
    # hidden_size=-256 with num_heads=3 is out of range, not "not divisible"
    with pytest.raises(ConfigError, match=r"out-of-range value -256 for 'model\.language\.hidden_size'"):
        load_config(minimal, ["--model.language.num_heads=3", "--model.language.hidden_size=-256"])
    # a bad [training] key is reported before a cross-key problem of [model.language], which comes first in the file
    with pytest.raises(ConfigError, match=r"out-of-range value 0 for 'training\.global_batch_size'"):
        load_config(minimal, ["--model.language.num_heads=3", "--training.global_batch_size=0"])


@pytest.mark.parametrize(
    "override,fragments",
    [
        (["--model.language.rope_theta=-1"], ["'model.language.rope_theta'", "-1.0", "> 0"]),
        (["--model.language.num_layers=0"], ["'model.language.num_layers'", "value 0", ">= 1"]),
        (["--model.vision.patch_size=0"], ["'model.vision.patch_size'", "value 0", ">= 1"]),
        (["--model.language.num_kv_heads=0"], ["'model.language.num_kv_heads'", "value 0", ">= 1"]),
        (["--optimizer.betas=1.5,0.9"], ["'optimizer.betas'", "1.5", "< 1"]),
        (["--optimizer.eps=-1"], ["'optimizer.eps'", "-1.0", "> 0"]),
        (["--model.language.hidden_size=-256"], ["'model.language.hidden_size'", "-256", ">= 1"]),
        (
            ["--model.language.num_heads=3"],
            ["'model.language.hidden_size'", "hidden_size=256 is not divisible by num_heads=3", "head_dim"],
        ),
        (["--lr_schedule.warmup_steps=31"], ["'lr_schedule.warmup_steps'", "31", "run of 30 optimizer steps"]),
    ],
)
def test_probe_findings_on_a_shipped_config(override: list[str], fragments: list[str]) -> None:
    """The values a probe found to train on NaN, crash with a bare torch / ZeroDivisionError, or pass silently."""
    path = ROOT / "train_configs" / "debug_colocated.toml"
    with pytest.raises(ConfigError, match=err(path, *fragments, override[0])):
        load_config(path, override)


# --------------------------------------------------------------------------
# Modules are a registry: [model.<name>] with a type, [parallelism.<name>]
# --------------------------------------------------------------------------


def test_model_tables_are_named_by_the_user_and_typed(minimal: Path) -> None:
    cfg = load_config(minimal, ["--model.speech.hidden_size=48", "--parallelism.speech.rank_offset=2"])
    assert list(cfg.model.modules) == ["vision", "language", "speech"]
    assert list(cfg.model.encoders) == ["vision", "speech"] and cfg.model.language_name == "language"
    assert isinstance(cfg.model.speech, MODEL_TYPES["audio"]) and cfg.model.speech.hidden_size == 48
    assert cfg.model.vision.type == "vit" and cfg.model.language.type == "decoder"  # defaults by name
    assert list(cfg.parallelism.modules) == ["vision", "language", "speech"]
    d = cfg.to_dict()
    assert d["model"]["speech"]["type"] == "audio" and d["parallelism"]["speech"]["rank_offset"] == 2
    with pytest.raises(AttributeError, match="no section or key 'audio'"):
        _ = cfg.model.audio


@pytest.mark.parametrize(
    "edit_from,edit_to,fragments",
    [
        ('type = "audio"', 'type = "sound"', ("model.speech.type", "'sound'", "['audio', 'decoder', 'vit']")),
        ('type = "audio"', "", ("'model.speech' in", "has no type", "model.speech.type")),
        (
            "[parallelism.vision]",
            '[model.lm]\ntype = "decoder"\nvocab_size = 10\nhidden_size = 8\nintermediate_size = 8\nnum_layers = 1\n'
            "num_heads = 1\nnum_kv_heads = 1\n\n[parallelism.lm]\nrank_offset = 3\nnum_ranks = 1\n\n"
            "[parallelism.vision]",
            ("exactly one module must be the language model", "[model.language], [model.lm]"),
        ),
        ("[parallelism.speech]", "[parallelism.speach]", ("module 'speech' ([model.speech]) has no layout",)),
    ],
)
def test_bad_module_tables_name_the_table(tmp_path: Path, edit_from: str, edit_to: str, fragments) -> None:
    path = write(tmp_path, MINIMAL_TOML.replace(edit_from, edit_to, 1))
    with pytest.raises(ConfigError, match=err(path, *fragments)):
        load_config(path)


def test_a_layout_without_a_model_table_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TOML + "\n[parallelism.extra]\nrank_offset = 3\nnum_ranks = 1\n")
    with pytest.raises(ConfigError, match=err(path, "[parallelism.extra] lays out a module")):
        load_config(path)


def test_list_of_strings_override_takes_toml_quoting(minimal: Path) -> None:
    for text in ('["projector", "norm"]', "['projector', 'norm']", "projector, norm", "projector,norm"):
        assert load_config(minimal, [f"--training.trainable={text}"]).training.trainable == ["projector", "norm"]


def test_missing_model_section_says_what_to_add(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_TOML.split("[model.vision]")[0] + "[training]\nsteps = 1\n")
    with pytest.raises(ConfigError, match=err(path, "one [model.<name>] table per module")):
        load_config(path)


def test_data_path_takes_a_string_or_a_list():
    one = {"rank_offset": 0, "num_ranks": 1}
    from _tiny import tiny_config_dict

    d = tiny_config_dict(one, one, data={"path": ["a/{0000..0009}.tar", "b/*.tar"]})
    assert config_from_dict(d).data.path == ["a/{0000..0009}.tar", "b/*.tar"]
    assert config_from_dict(d, ["--data.path=[x.tar, y]"]).data.path == ["x.tar", "y"]
    assert config_from_dict(d, ["--data.path=c-{a,b}.tar"]).data.path == "c-{a,b}.tar"  # a string as written
    cfg = config_from_dict(d, ["--data.prefetch=0", "--data.shuffle_buffer=64"])
    assert (cfg.data.prefetch, cfg.data.shuffle_buffer) == (0, 64)
    with pytest.raises(ConfigError, match=r"wrong type for .data\.path..*string or list of strings"):
        config_from_dict(tiny_config_dict(one, one, data={"path": 3}))
    with pytest.raises(ConfigError, match=r"data\.shuffle_buffer"):
        config_from_dict(d, ["--data.shuffle_buffer=0"])
