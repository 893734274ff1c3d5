"""Hugging Face import / export (``mimo_titan.checkpoint.hf``, ``scripts/convert_hf.py``) against real transformers
models.

Tiny random HF models (every weight, norm scales included, drawn at random so that a swapped mapping cannot pass)
are saved with ``save_pretrained``, imported into our modules and must give the same logits / hidden states
(1e-4, fp32); our exports must load in ``from_pretrained`` with the same outputs and re-import bit-exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _tiny import SHARED, config_toml  # noqa: E402
from mimo_titan.checkpoint import hf  # noqa: E402
from mimo_titan.config import (  # noqa: E402
    LanguageModelConfig,
    MoEConfig,
    RopeScalingConfig,
    VisionModelConfig,
    config_from_dict,
)
from mimo_titan.models import DecoderLM, MimoModel, VisionEncoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 2048  # the test tokenizer's model.language.vocab_size (train_configs/debug_noncolocated.toml)
LM = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-6,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
LM_CASES = {  # id: (config class, model class, extra config kwargs)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_theta=1000000.0)),
    # Llama 3.1's RoPE scaling with a short original context, so that it changes the rotations of the test's tokens
    "llama3_1_rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", MOE),
    "qwen3_moe_dense_first": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(MOE, mlp_only_layers=[0], norm_topk_prob=True),
    ),
}
ARCH = {
    "llama": "llama",
    "llama_tied": "llama",
    "llama3_1_rope": "llama",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "qwen3_moe_dense_first": "qwen3_moe",
}
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: scales ``1 + 0.3 N(0, 1)`` for norm weights, ``0.2 N(0, 1)`` elsewhere."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        is_scale = "norm" in name and name.endswith("weight")
        p.copy_(1 + 0.3 * noise if is_scale else 0.2 * noise)
    return model.eval()


def _hf_lm(case: str, seed: int = 0):
    cfg_cls, model_cls, extra = LM_CASES[case]
    extra = copy.deepcopy(extra)  # transformers writes rope_theta into a rope_scaling dict it is given
    cfg = getattr(transformers, cfg_cls)(**LM, **extra, attn_implementation="eager")
    torch.manual_seed(seed)
    return _randomize(getattr(transformers, model_cls)(cfg), seed)


def _ours_lm(hf_dir):
    config, state = hf.load_hf_dir(hf_dir)
    fields = hf.lm_config_from_hf(config)
    cfg = LanguageModelConfig(
        **{**fields, "moe": MoEConfig(**fields["moe"]), "rope_scaling": RopeScalingConfig(**fields["rope_scaling"])}
    )
    model = DecoderLM(cfg).eval()
    model.load_state_dict(hf.lm_state_from_hf(state, cfg), strict=True)
    return cfg, model


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(LM_CASES))
def test_language_import_matches_hf_and_export_round_trips(case, tmp_path):
    ref = _hf_lm(case)
    ref.save_pretrained(tmp_path / "hf")
    cfg, ours = _ours_lm(tmp_path / "hf")
    ids = _ids()
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=0)
    assert cfg.qk_norm == case.startswith("qwen3") and cfg.tie_word_embeddings == (case == "llama_tied")
    if case == "llama3_1_rope":
        want = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
        assert cfg.rope_scaling == RopeScalingConfig(type="llama3", **want)
        plain = DecoderLM(dataclasses.replace(cfg, rope_scaling=RopeScalingConfig())).eval()
        plain.load_state_dict(ours.state_dict())
        with torch.no_grad():  # without the scaling the logits differ: the import really maps it
            assert (plain(ids) - expected).abs().max() > 1e-2

    # the in-memory (fused experts in transformers 5) state converts to the same weights as the file
    from_memory = hf.lm_state_from_hf(ref.state_dict(), cfg)
    for k, v in ours.state_dict().items():
        assert torch.equal(from_memory[k], v), k

    # export: the same keys as HF's own files, loadable by from_pretrained with the same logits, exact re-import
    exported = hf.lm_state_to_hf(ours.state_dict(), cfg)
    _, on_disk = hf.load_hf_dir(tmp_path / "hf")
    assert set(exported) == set(on_disk)
    hf.save_hf_dir(tmp_path / "out", hf.hf_lm_config(cfg, ARCH[case]), exported)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back) is type(ref)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, atol=1e-4, rtol=0)
    cfg2, again = _ours_lm(tmp_path / "out")
    assert cfg2 == cfg
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_moe_layers_follow_mlp_only_layers(tmp_path):
    ref = _hf_lm("qwen3_moe_dense_first")
    ref.save_pretrained(tmp_path)
    cfg, ours = _ours_lm(tmp_path)
    assert (cfg.moe.first_layer, cfg.moe.layer_freq, cfg.moe.norm_topk_prob) == (1, 1, True)
    assert hasattr(ours.model.layers["0"].mlp, "gate_proj") and hasattr(ours.model.layers["1"].mlp, "experts")
    out = hf.hf_lm_config(cfg, "qwen3_moe")
    assert (out["decoder_sparse_step"], out["mlp_only_layers"]) == (1, [0])


def test_sharded_directories_load_and_save(tmp_path):
    ref = _hf_lm("qwen3")
    ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    config, state = hf.load_hf_dir(tmp_path / "hf")
    assert set(state) == set(ref.state_dict())
    hf.save_hf_dir(tmp_path / "ours", config, state, max_shard_bytes=40_000)
    assert len(list((tmp_path / "ours").glob("model-*.safetensors"))) > 1
    _, again = hf.load_hf_dir(tmp_path / "ours")
    assert all(torch.equal(again[k], v) for k, v in state.items()) and set(again) == set(state)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.state_dict().items())


def _hf_siglip(seed: int = 1):
    torch.manual_seed(seed)
    cfg = transformers.SiglipVisionConfig(**VISION, attn_implementation="eager")
    return _randomize(transformers.SiglipVisionModel(cfg), seed)


def _vis_cfg(fields: dict) -> VisionModelConfig:
    return VisionModelConfig(**fields, projector_intermediate_size=16)


@pytest.mark.parametrize("prefixed", [False, True])
def test_vision_import_matches_siglip_and_export_round_trips(prefixed, tmp_path):
    ref = _hf_siglip()
    ref.save_pretrained(tmp_path / "hf")
    config, state = hf.load_hf_dir(tmp_path / "hf")
    if prefixed:  # files written by transformers 4 carry the vision_model. prefix
        state = {"vision_model." + k: v for k, v in state.items()}
    assert any(k.startswith("head.") for k in ref.state_dict())  # the pooling head exists and is dropped
    cfg = _vis_cfg(hf.vision_config_from_hf(config))
    enc = VisionEncoder(cfg, out_dim=24).eval()
    missing, unexpected = enc.load_state_dict(hf.vision_state_from_hf(state, cfg), strict=False)
    assert not unexpected and all(k.startswith("multi_modal_projector.") for k in missing) and missing
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(enc.vision_model(pixels), expected, atol=1e-4, rtol=0)

    exported = hf.vision_state_to_hf(enc.state_dict(), cfg)
    hf.save_hf_dir(tmp_path / "out", hf.hf_vision_config(cfg), exported)
    back = transformers.SiglipVisionModel.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert not any(k.startswith("head.") for k in back.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=pixels).last_hidden_state, expected, atol=1e-4, rtol=0)
    config2, state2 = hf.load_hf_dir(tmp_path / "out")
    assert _vis_cfg(hf.vision_config_from_hf(config2)) == cfg
    again = hf.vision_state_from_hf(state2, cfg)
    assert set(again) == set(exported) and all(torch.equal(again[k], v) for k, v in exported.items())


def test_vision_normalisation_comes_from_the_preprocessor_and_exports_as_hf_reads_it(tmp_path):
    """``image_mean`` / ``image_std`` are read from ``preprocessor_config.json`` (as HF's ``SiglipImageProcessor``
    writes it), SigLIP's 0.5 / 0.5 without one; the file our export writes makes HF's image processor give the
    pixels our processor gives (a synthetic image, 1e-5)."""
    import io

    from PIL import Image

    from mimo_titan.data import ImageTextProcessor

    # the PIL image processor (transformers 5 names it ...Pil; its default one needs torchvision and resizes otherwise)
    processor_cls = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    config = hf.hf_vision_config(_vis_cfg(hf.vision_config_from_hf({"model_type": "siglip_vision_model", **VISION})))
    assert hf.vision_config_from_hf(config)["image_mean"] == [0.5] * 3  # the family default
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    processor_cls(image_mean=mean, image_std=std).save_pretrained(tmp_path / "hf")
    fields = hf.vision_config_from_hf(config, hf.load_hf_preprocessor(str(tmp_path / "hf")))
    assert (fields["image_mean"], fields["image_std"]) == (mean, std)
    assert hf.load_hf_preprocessor(str(tmp_path)) is None
    plain = hf.vision_config_from_hf(config, {"do_normalize": False})
    assert (plain["image_mean"], plain["image_std"]) == ([0.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError, match=r"rescale_factor=1\.0: our image processor scales pixels to"):
        hf.vision_config_from_hf(config, {"rescale_factor": 1.0})
    with pytest.raises(ValueError, match=r"preprocessor_config.json image_std=\[0.5\]: give three"):
        hf.vision_config_from_hf(config, {"image_std": [0.5]})

    cfg = _vis_cfg(fields)
    os.makedirs(tmp_path / "out")
    with open(tmp_path / "out" / "preprocessor_config.json", "w") as f:
        json.dump(hf.hf_vision_preprocessor_config(cfg), f)
    theirs = processor_cls.from_pretrained(tmp_path / "out")
    pixels = torch.arange(20 * 12 * 3, dtype=torch.uint8).view(20, 12, 3)  # not square: the resize matters
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, format="PNG")
    ours = ImageTextProcessor(SHARED / "tokenizer", cfg.image_size, 16, image_mean=mean, image_std=std)
    expected = theirs(Image.open(io.BytesIO(buf.getvalue())), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours.load_image(buf.getvalue()), expected, atol=1e-5, rtol=0)


def test_vision_tower_of_a_full_siglip_model():
    text = dict(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(2)
    full = _randomize(transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=VISION)), 2)
    cfg = _vis_cfg(hf.vision_config_from_hf(full.config.to_dict()))
    ours = hf.vision_state_from_hf(full.state_dict(), cfg)  # text tower, logit scale / bias and head dropped
    enc = VisionEncoder(cfg, out_dim=8).eval()
    missing, unexpected = enc.load_state_dict(ours, strict=False)
    assert not unexpected and all(k.startswith("multi_modal_projector.") for k in missing)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            enc.vision_model(pixels), full.vision_model(pixel_values=pixels).last_hidden_state, atol=1e-4, rtol=0
        )


# ----------------------------------------------------------------------------------------------------- errors
def _llama_json(**kw) -> dict:
    return {"model_type": "llama", **LM, **kw}


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(rope_scaling={"rope_type": "linear", "factor": 8.0}), "rope_scaling with rope_type='linear'"),
        (
            dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
            "rope_type='llama3' but no low_freq_factor, high_freq_factor, original_max_position_embeddings",
        ),
        (
            dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
            "rope_parameters with rope_type='yarn'",
        ),
        (dict(attention_bias=True), "attention_bias=true"),
        (dict(mlp_bias=True), "mlp_bias=true"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(model_type="mistral"), "model_type='mistral' is not a supported"),
    ],
)
def test_unsupported_language_configs_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        hf.lm_config_from_hf(_llama_json(**kw))


def test_llama3_1_rope_scaling_read_from_a_saved_config(tmp_path):
    """A Llama-3.1-style config.json as transformers 5 writes it (``rope_parameters``) maps to our rope_scaling."""
    factors = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(
        **LM,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", **factors},
    )
    cfg.save_pretrained(tmp_path)
    fields = hf.lm_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert fields["rope_theta"] == 500000.0 and fields["rope_scaling"] == {"type": "llama3", **factors}
    exported = hf.hf_lm_config(fields, "llama")
    assert exported["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, **factors}
    assert exported["max_position_embeddings"] == 8192 * 8


def test_mlp_only_layers_that_no_stride_expresses_are_rejected():
    qwen = {**LM, "num_hidden_layers": 4, "model_type": "qwen3_moe", **MOE}
    moe = hf.lm_config_from_hf({**qwen, "mlp_only_layers": [0, 2]})["moe"]  # layers 1, 3: step 2
    assert (moe["first_layer"], moe["layer_freq"]) == (1, 2)
    assert moe == hf.lm_config_from_hf({**qwen, "decoder_sparse_step": 2})["moe"]
    with pytest.raises(ValueError, match="mlp_only_layers=\\[1\\]"):
        hf.lm_config_from_hf({**qwen, "mlp_only_layers": [1]})


@pytest.mark.parametrize("model_type", ["clip", "clip_vision_model"])
def test_clip_is_rejected(model_type):
    with pytest.raises(ValueError, match="CLIP's vision tower has a class embedding, a pre-layernorm"):
        hf.vision_config_from_hf({"model_type": model_type, "hidden_size": 32})


def test_export_rejects_what_the_arch_lacks():
    cfg = LanguageModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, qk_norm=True
    )
    with pytest.raises(ValueError, match="qk_norm=True but HF llama has no q/k norms"):
        hf.hf_lm_config(cfg, "llama")
    with pytest.raises(ValueError, match="num_experts=0 does not fit HF qwen3_moe"):
        hf.hf_lm_config(cfg, "qwen3_moe")
    moe = LanguageModelConfig(
        **{**cfg.__dict__, "moe": MoEConfig(num_experts=4, intermediate_size=8, shared_expert_intermediate_size=8)}
    )
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=8"):
        hf.hf_lm_config(moe, "qwen3_moe")


# ------------------------------------------------------------------------------------------------- MIMO level
def _model_cfg_dict(**language) -> dict:
    return {
        "job": {"seed": 5},
        "model": {
            "vision": {
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 2,
                "intermediate_size": 64,
                "projector_intermediate_size": 48,
            },
            "language": {
                "vocab_size": VOCAB,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
                "head_dim": 8,
                "rope_theta": 500000.0,
                **language,
            },
        },
        "parallelism": {"vision": {"rank_offset": 0, "num_ranks": 1}, "language": {"rank_offset": 0, "num_ranks": 1}},
        "training": {"steps": 1, "global_batch_size": 2, "seq_len": 64},
        "optimizer": {"lr": 1e-3},
        "data": {"path": str(SHARED / "cc12m"), "tokenizer": str(SHARED / "tokenizer")},
    }


def _mimo_state(cfg, seed=3) -> dict:
    torch.manual_seed(seed)
    return _randomize(MimoModel(cfg.model, 1998), seed).state_dict()


def test_mimo_export_import_round_trip_with_projector(tmp_path):
    cfg = config_from_dict(
        _model_cfg_dict(qk_norm=True, moe={"num_experts": 4, "top_k": 2, "intermediate_size": 16, "first_layer": 1})
    )
    state = _mimo_state(cfg)
    hf.export_hf(cfg.model, state, str(tmp_path / "out"), "qwen3_moe")
    assert sorted(os.listdir(tmp_path / "out")) == ["language", hf.PROJECTOR_FILE, "vision"]
    fresh = _mimo_state(cfg, seed=4)
    back = hf.import_hf(cfg.model, fresh, str(tmp_path / "out" / "language"), str(tmp_path / "out" / "vision"))
    assert set(back) == set(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    assert not torch.equal(fresh["language.model.norm.weight"], state["language.model.norm.weight"])  # not mutated
    only_lm = hf.import_hf(cfg.model, fresh, language_dir=str(tmp_path / "out" / "language"))
    assert torch.equal(
        only_lm["vision.multi_modal_projector.linear_1.weight"], fresh["vision.multi_modal_projector.linear_1.weight"]
    )
    assert torch.equal(only_lm["language.lm_head.weight"], state["language.lm_head.weight"])


def test_mimo_export_import_round_trip_with_an_audio_encoder(tmp_path):
    """An audio encoder exports as a Whisper encoder directory named as its module plus its projector file, and
    comes back exactly; a Whisper config that differs is listed by field."""
    d = _model_cfg_dict()
    d["model"]["speech"] = {
        "type": "audio",
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "intermediate_size": 32,
        "projector_intermediate_size": 32,
        "max_source_positions": 50,
    }
    d["parallelism"]["speech"] = {"rank_offset": 0, "num_ranks": 1}
    cfg = config_from_dict(d)

    def model(seed):  # parameters random; the audio encoder's sinusoidal positions (a buffer) as initialised
        m = MimoModel(cfg.model, 1998, audio_token_id=2020)
        m.init_weights(seed)
        return _randomize(m, seed).state_dict()

    state = model(0)
    hf.export_hf(cfg.model, state, str(tmp_path / "out"), "llama")
    assert sorted(os.listdir(tmp_path / "out")) == [
        "language",
        hf.PROJECTOR_FILE,
        "speech",
        "speech_projector.safetensors",
        "vision",
    ]
    fresh = model(1)
    out = tmp_path / "out"
    back = hf.import_hf(cfg.model, fresh, str(out / "language"), str(out / "vision"), audio_dir=str(out / "speech"))
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    d["model"]["speech"]["intermediate_size"] = 48
    with pytest.raises(ValueError, match=r"model.speech.intermediate_size=48 vs HF encoder_ffn_dim=32"):
        hf.import_hf(config_from_dict(d).model, fresh, audio_dir=str(out / "speech"))


def test_import_lists_every_config_mismatch(tmp_path):
    _hf_lm("llama").save_pretrained(tmp_path / "lm")
    _hf_siglip().save_pretrained(tmp_path / "vis")
    cfg = config_from_dict(_model_cfg_dict(rope_theta=10000.0, num_kv_heads=4))
    cfg.model.vision.patch_size = 16
    with pytest.raises(ValueError) as err:
        hf.import_hf(cfg.model, {}, str(tmp_path / "lm"), str(tmp_path / "vis"))
    msg = str(err.value)
    for part in (
        "model.language.num_kv_heads=4 vs HF num_key_value_heads=2",
        "model.language.rope_theta=10000.0 vs HF rope_theta=500000.0",
        "model.vision.patch_size=16 vs HF patch_size=8",
        # CLIP's normalisation (the default) vs SigLIP's, the family default of a directory without a preprocessor
        "model.vision.image_mean=[0.48145466, 0.4578275, 0.40821073] vs HF image_mean (SigLIP's; the directory has "
        "no preprocessor_config.json)=[0.5, 0.5, 0.5]",
        "model.vision.image_std=[0.26862954, 0.26130258, 0.27577711] vs HF image_std (SigLIP's",
    ):
        assert part in msg, msg
    qwen = config_from_dict(_model_cfg_dict(qk_norm=True))
    with pytest.raises(ValueError, match=r"model\.language\.qk_norm=True vs HF model_type"):
        hf.import_hf(qwen.model, {}, str(tmp_path / "lm"))
    scaled = config_from_dict(_model_cfg_dict(rope_scaling={"type": "llama3"}))
    with pytest.raises(ValueError, match=r"model\.language\.rope_scaling=\{'type': 'llama3', 'factor': 8\.0.*vs HF"):
        hf.import_hf(scaled.model, {}, str(tmp_path / "lm"))


# ---------------------------------------------------------------------------------------------- convert_hf.py
def _convert(*args) -> None:
    """``scripts/convert_hf.py ARGS`` through its ``main`` in this process (no new interpreter importing torch and
    transformers again); the script's own command line, a failure included, is run as a process below."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_hf_script", REPO / "scripts" / "convert_hf.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([str(a) for a in args])  # a user error raises SystemExit with its one line


def test_convert_script_import_then_export(tmp_path):
    lm = _hf_lm("llama")
    lm.save_pretrained(tmp_path / "hf_lm")
    vis = _hf_siglip()
    vis.save_pretrained(tmp_path / "hf_vis")  # no preprocessor_config.json: SigLIP's normalisation, 0.5 / 0.5
    config = tmp_path / "run.toml"
    d = _model_cfg_dict()
    d["model"]["vision"].update(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    config.write_text(config_toml(d))
    _convert(
        "import",
        "--config",
        config,
        "--hf-language",
        tmp_path / "hf_lm",
        "--hf-vision",
        tmp_path / "hf_vis",
        "--out",
        tmp_path / "ckpt",
    )
    _convert(
        "export",
        "--config",
        config,
        "--checkpoint",
        tmp_path / "ckpt",
        "--out",
        tmp_path / "out",
        "--language-arch",
        "llama",
    )
    _, lm_state = hf.load_hf_dir(tmp_path / "hf_lm")
    _, lm_back = hf.load_hf_dir(tmp_path / "out" / "language")
    assert set(lm_back) == set(lm_state) and all(torch.equal(lm_back[k], v) for k, v in lm_state.items())
    _, vis_back = hf.load_hf_dir(tmp_path / "out" / "vision")
    vis_state = {k: v for k, v in vis.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(vis_back["vision_model." + k], v) for k, v in vis_state.items())
    pre = hf.load_hf_preprocessor(str(tmp_path / "out" / "vision"))
    assert pre is not None and (pre["image_mean"], pre["image_std"]) == ([0.5] * 3, [0.5] * 3)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "out" / "language" / "tokenizer.json"))  # as the run used it
    assert tok.decode(tok.encode("Red Square").ids) == "Red Square"  # merges repaired, spaces kept
    # a model HF cannot represent: one line naming the field, no traceback, nothing written
    bad = ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "bad"), "--language-arch", "qwen3"]
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_hf.py"), "export", "--config", str(config), *bad],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("convert_hf: ValueError: model.language.qk_norm=False")
    assert not (tmp_path / "bad").exists()

    from mimo_titan.checkpoint import load_full_model_state  # the projector: the seeded init of a fresh model

    cfg = config_from_dict(_model_cfg_dict())
    ckpt = load_full_model_state(str(tmp_path / "ckpt"), cfg)
    from safetensors.torch import load_file

    proj = load_file(tmp_path / "out" / hf.PROJECTOR_FILE)
    assert set(proj) == {f"multi_modal_projector.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    assert all(torch.equal(ckpt["vision." + k], v) for k, v in proj.items())
    with torch.no_grad():
        torch.testing.assert_close(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "language")(_ids()).logits,
            lm(_ids()).logits,
            atol=1e-4,
            rtol=0,
        )
