"""The FLOPs model (mimo_titan.train.flops) against the real modules, the peak table, and the metrics sinks; no
process group. The multi-rank parts (memory over a module's ranks, the JSONL file of a run) are checked in
tests/test_train.py's launches."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_oracle import AUDIO
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from _tiny import tiny_config_dict
from mimo_titan.config import config_from_dict
from mimo_titan.errors import ConfigError
from mimo_titan.train import flops
from mimo_titan.train.metrics import MetricsWriter, check_metrics_config, detect_peak_tflops, peak_tflops

V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731
MOE = {"num_experts": 4, "top_k": 2, "intermediate_size": 24, "shared_expert_intermediate_size": 16}


def _cfg(**sections):
    d = tiny_config_dict(V(0, 1), V(1, 1), **sections)
    d["model"]["audio"], d["parallelism"]["audio"] = dict(AUDIO), V(2, 1)
    return config_from_dict(d)


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {
            "model": {
                "language": {"moe": {**MOE, "first_layer": 1}, "qk_norm": True, "tie_word_embeddings": True},
                "vision": {"moe": {**MOE, "top_k": 1}},
            }
        },
    ],
    ids=["dense", "moe_qknorm_tied"],
)
def test_parameter_counts_equal_the_models_numel_and_active_counts_follow_top_k(sections):
    from mimo_titan.checkpoint.state import meta_model

    cfg = _cfg(**sections)
    model = meta_model(cfg.model)
    for name in cfg.model.modules:
        module = getattr(model, name)
        count = flops.module_params(cfg, name)
        assert count.total == sum(p.numel() for p in module.parameters()), name
        # active: every matmul parameter, routed experts scaled by top_k / num_experts, the LM head even when tied
        active = 0.0
        for key, p in module.named_parameters():
            if (
                "embed_tokens" in key
                or "position_embedding" in key
                or key.startswith(flops.PROJECTOR_PREFIX.get(getattr(cfg.model, name).type, "-"))
            ):
                continue
            moe = getattr(cfg.model, name).moe if ".experts." in key else None
            active += p.numel() * (moe.top_k / moe.num_experts if moe else 1)
        if name == "language" and cfg.model.language.tie_word_embeddings:  # the head's matmul, on the shared weight
            active += cfg.model.language.vocab_size * cfg.model.language.hidden_size
        if name == "audio":
            active -= flops.audio_conv1_params(cfg.model.audio)  # applied per mel frame, counted apart
        assert count.active == active, name
        proj = flops.PROJECTOR_PREFIX.get(getattr(cfg.model, name).type)
        if proj:
            assert count.projector == sum(p.numel() for k, p in module.named_parameters() if k.startswith(proj))


def _counted(fn) -> int:
    """Matmul FLOPs of ``fn()`` (forward and backward) by FlopCounterMode; attention through SDPA's math backend,
    whose bmm calls the counter sees (CPU's fused SDPA kernel is not counted)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", [flops.TRAIN, flops.BACKPROP, flops.FORWARD])
def test_flops_of_the_tiny_modules_match_torchs_flop_counter(mode):
    """LM (4 layers, GQA, SwiGLU), ViT with projector, audio encoder with projector: the formulas within 3 % of
    FlopCounterMode on a forward + backward (train: weights and inputs need gradients; backprop: only the inputs;
    forward: no backward)."""
    from mimo_titan.models.audio import AudioEncoder
    from mimo_titan.models.decoder import DecoderLM
    from mimo_titan.models.vit import VisionEncoder

    torch.manual_seed(0)
    cfg = _cfg(model={"language": {"num_layers": 4}})
    lm_cfg, hidden = cfg.model.language, cfg.model.language.hidden_size

    def run(module, *inputs):
        for p in module.parameters():
            p.requires_grad_(mode == flops.TRAIN)
        for t in inputs:
            if t.is_floating_point():
                t.requires_grad_(mode != flops.FORWARD)

        def step():
            with torch.set_grad_enabled(mode != flops.FORWARD):
                out = module(*inputs)
                if mode != flops.FORWARD:
                    out.float().sum().backward()

        return _counted(step)

    b, s = 2, 48
    lm = DecoderLM(lm_cfg)
    lm.init_weights()
    counted = run(lm, torch.zeros(b, s, dtype=torch.long), torch.randn(b, s, hidden))
    assert counted == pytest.approx(b * s * flops.lm_flops_per_token(lm_cfg, s, mode), rel=0.03)

    vit = VisionEncoder(cfg.model.vision, hidden)
    vit.init_weights()
    images = 3
    counted = run(vit, torch.randn(images, 3, 32, 32))
    assert counted == pytest.approx(images * flops.vit_flops_per_image(cfg.model.vision, hidden, mode), rel=0.03)

    audio_cfg = config_from_dict(
        tiny_config_dict(V(0, 1), V(1, 1), model={"audio": {**AUDIO, "pool": 2}}, parallelism={"audio": V(2, 1)})
    ).model.audio
    audio = AudioEncoder(audio_cfg, hidden)
    audio.init_weights()
    frames = 101  # two clips of 101 mel frames: 51 encoder frames each, 26 LM tokens each
    counted = run(audio, torch.randn(2, audio_cfg.num_mel_bins, frames), torch.tensor([frames, frames]))
    assert counted == pytest.approx(2 * flops.audio_flops_per_clip(audio_cfg, hidden, frames, mode), rel=0.03)


def test_part_modes_follow_what_trains_upstream():
    T, B, F = flops.TRAIN, flops.BACKPROP, flops.FORWARD
    assert flops.part_modes(_cfg()) == {
        "vision": {"tower": T, "projector": T},
        "audio": {"tower": T, "projector": T},
        "language": {"model": T},
    }
    # LLaVA stage 1: the projectors train; the towers only run forward; the frozen LM passes their gradient back
    assert flops.part_modes(_cfg(training={"trainable": ["projector"]})) == {
        "vision": {"tower": F, "projector": T},
        "audio": {"tower": F, "projector": T},
        "language": {"model": B},
    }
    frozen_encoders = _cfg(model={"vision": {"frozen": True}, "audio": {"frozen": True}})
    assert flops.part_modes(frozen_encoders)["vision"] == {"tower": F, "projector": F}
    assert flops.part_modes(frozen_encoders)["language"] == {"model": T}
    # a trained tower behind a frozen projector: the projector passes the gradient back
    tower_only = _cfg(training={"trainable": ["vision.vision_model", "language"]})
    assert flops.part_modes(tower_only)["vision"] == {"tower": T, "projector": B}
    assert flops.part_modes(tower_only)["audio"] == {"tower": F, "projector": F}
    # frozen modes cost 2N / 4N of the trained 6N (attention core: 4 / 12 of 12)
    lm = _cfg().model.language
    p = flops.lm_params(lm)
    assert flops.lm_flops_per_token(lm, 64, F) == 2 * p.active + 4 * p.attention_width * 64
    assert flops.lm_flops_per_token(lm, 64, B) == 4 * p.active + 12 * p.attention_width * 64


def test_peak_tflops_table_and_override():
    assert detect_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert detect_peak_tflops("NVIDIA H100 80GB HBM3") == 989.5
    assert detect_peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert detect_peak_tflops("NVIDIA H100 NVL") == 835.5
    assert detect_peak_tflops("NVIDIA H200") == 989.5
    assert detect_peak_tflops("NVIDIA B200") == 2250.0
    assert detect_peak_tflops("NVIDIA GeForce RTX 4090") is None
    cpu = torch.device("cpu")
    assert peak_tflops(_cfg(), cpu) is None  # no MFU on CPU unless the peak is given
    assert peak_tflops(_cfg(metrics={"peak_tflops": 2.5}), cpu) == 2.5


def test_metrics_writer_jsonl_rank0_only_truncates_a_new_run_and_appends_a_resumed_one(tmp_path):
    cfg = _cfg(job={"output_dir": str(tmp_path)})
    rec = {"step": 1, "loss": 1.0, "sample_ids": [1, 2], "modules": {"language": {"flops": 3.0}}}
    path = tmp_path / "metrics.jsonl"
    # a run of steps 1-2; a new run rewrites the file (step 1); that run resumed after step 1 appends step 2
    for start, written, steps in ((0, [1, 2], [1, 2]), (0, [1], [1]), (1, [2], [1, 2])):
        writer = MetricsWriter(cfg, rank=0, start_step=start)
        for step in written:
            writer.write({**rec, "step": step})
        writer.close()
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["step"] for r in rows] == steps and "sample_ids" not in rows[0]
        assert rows[0]["modules"] == {"language": {"flops": 3.0}}
    other = MetricsWriter(_cfg(job={"output_dir": str(tmp_path / "r1")}), rank=1)
    other.write(rec)
    other.close()
    assert not (tmp_path / "r1").exists()


def test_tensorboard_scalars_are_written_per_module(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(job={"output_dir": str(tmp_path)}, metrics={"tensorboard": True, "jsonl": ""})
    module = {"tokens_per_s": 10.0, "items_per_s": 2.0, "tflops_per_rank": 0.5, "mem_gib": 1.25, "mfu": None}
    base = {"grad_norm": 1.0, "lr": 1e-3, "step_time_s": 0.5, "data_wait_s": 0.01, "tokens_per_s": 10.0}
    writer = MetricsWriter(cfg, rank=0)
    for step, loss in ((1, 2.5), (2, 2.0)):
        writer.write({**base, "step": step, "loss": loss, "modules": {"language": module, "vision": module}})
    writer.close()
    acc = EventAccumulator(str(tmp_path / cfg.metrics.tensorboard_dir))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
    assert [e.value for e in acc.Scalars("vision/mem_gib")] == [1.25, 1.25]
    assert "language/mfu" not in acc.Tags()["scalars"]  # no peak: no MFU


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError, match=r"metrics.tensorboard = true needs the tensorboard package.*pip install"):
        check_metrics_config(_cfg(metrics={"tensorboard": True}))
    check_metrics_config(_cfg())  # off: nothing needed
