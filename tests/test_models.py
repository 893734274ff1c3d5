"""Models without any process group: the image merge, pipeline splitting, causality."""

from __future__ import annotations

import pytest
import torch

from _tiny import BASE
from mimo_titan.config import config_from_dict
from mimo_titan.models import LanguageStage, MimoModel, merge_image_embeddings, scatter_image_embeddings
from mimo_titan.pipeline.stages import (
    LanguageChunks,
    split_language_model,
    stage_layer_range,
    virtual_stage_indices,
)

IMG = 1998


def _cfg(**language):
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    d["model"] = {"vision": dict(BASE["model"]["vision"]), "language": {**BASE["model"]["language"], **language}}
    d["parallelism"] = {"vision": {"rank_offset": 0, "num_ranks": 1}, "language": {"rank_offset": 0, "num_ranks": 1}}
    return config_from_dict(d)


def _model(**language):
    cfg = _cfg(**language)
    m = MimoModel(cfg.model, IMG)
    m.init_weights(7)
    return cfg, m


def test_scatter_and_merge_place_image_rows_at_placeholders():
    ids = torch.tensor([[5, IMG, IMG, 6], [IMG, 7, 8, IMG]])
    rows = torch.arange(4 * 3, dtype=torch.float32).view(4, 3)
    dense = scatter_image_embeddings(rows, ids, IMG)
    assert dense[0, 1].tolist() == rows[0].tolist() and dense[0, 2].tolist() == rows[1].tolist()
    assert dense[1, 0].tolist() == rows[2].tolist() and dense[1, 3].tolist() == rows[3].tolist()
    assert dense[0, 0].abs().sum() == 0
    text = torch.full((2, 4, 3), -1.0)
    merged = merge_image_embeddings(text, ids, dense, IMG)
    assert merged[0, 0].tolist() == [-1.0] * 3 and merged[1, 3].tolist() == rows[3].tolist()


def test_scatter_raises_when_counts_differ():
    ids = torch.tensor([[5, IMG, IMG, 6]])
    with pytest.raises(ValueError, match=r"2 placeholder tokens \(id \d+\) but 3 encoder rows"):
        scatter_image_embeddings(torch.zeros(3, 8), ids, IMG)


def test_mimo_forward_raises_on_image_count_mismatch():
    cfg, m = _model()
    P = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    ids = torch.tensor([[1] + [IMG] * P + [2, 3]])
    pixels = torch.randn(2, 3, 32, 32)  # two images, one image's placeholders
    with pytest.raises(ValueError, match="placeholder"):
        m(ids, pixels)
    assert m(ids, pixels[:1]).shape == (1, P + 3, cfg.model.language.vocab_size)


def test_image_changes_only_reach_tokens_at_and_after_its_placeholders():
    cfg, m = _model()
    P = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    ids = torch.tensor([[11, 12] + [IMG] * P + [13, 14]])
    x = torch.randn(1, 3, 32, 32)
    a, b = m(ids, x), m(ids, x + 1.0)
    torch.testing.assert_close(a[:, :2], b[:, :2])  # causal: positions before the image are unaffected
    assert (a[:, 2:] - b[:, 2:]).abs().max() > 1e-4


@pytest.mark.parametrize("pp", [2, 3])
def test_pipeline_stages_compose_to_the_full_model(pp):
    cfg, m = _model(num_layers=5)
    ids = torch.randint(0, 1900, (2, 9))
    ids[0, 3] = IMG
    dense = scatter_image_embeddings(torch.randn(1, cfg.model.language.hidden_size), ids, IMG)
    full = LanguageStage(m.language, IMG)(ids, dense)
    names = []
    x = None
    for s in range(pp):
        part = LanguageStage(split_language_model(m.language, pp, s), IMG)
        names += [n for n, _ in part.named_parameters()]
        x = part(ids, dense) if s == 0 else part(x)
    torch.testing.assert_close(x, full)
    assert sorted(names) == sorted(n for n, _ in LanguageStage(m.language, IMG).named_parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_virtual_stages_run_the_model_and_keep_one_stages_names(tied):
    """pp = 2 ranks of 2 chunks each (4 of 8 layers per rank): the chunks in global order compute the full model, and
    each rank's LanguageChunks shows its tensors (shared, not copied) under one stage's names, each once."""
    cfg, m = _model(num_layers=8, tie_word_embeddings=tied)
    ids = torch.randint(0, 1000, (2, 6))
    dense = torch.zeros(2, 6, cfg.model.language.hidden_size)
    full = LanguageStage(m.language, IMG)(ids, dense)
    pp, v = 2, 2
    chunks = {k: LanguageStage(split_language_model(m.language, pp * v, k), IMG) for k in range(pp * v)}
    x = None
    for k in range(pp * v):
        x = chunks[k](ids, dense) if k == 0 else chunks[k](x)
    torch.testing.assert_close(x, full)
    names = []
    for rank in range(pp):
        stages = virtual_stage_indices(pp, v, rank)
        held = LanguageChunks([chunks[k] for k in stages], stages, pp * v)
        params = dict(held.named_parameters())
        names += list(params)
        layers = sorted({int(n.split(".")[3]) for n in params if ".layers." in n})
        assert layers == [0, 1, 4, 5] if rank == 0 else [2, 3, 6, 7]
        owned = {id(p) for k in stages for p in chunks[k].parameters()}
        assert {id(p) for p in params.values()} == owned  # the chunks' own tensors, each once
        assert set(held.state_dict()) == {n for c in stages for n in chunks[c].state_dict()}
        assert ("language.model.embed_tokens.weight" in params) == (rank == 0)
        assert ("language.lm_head.weight" in params) == (rank == pp - 1)
    # the single stage's names; with tied embeddings the last rank's head is the second copy of the one tensor
    single = [n for n, _ in LanguageStage(m.language, IMG).named_parameters()]
    assert sorted(names) == sorted(single + (["language.lm_head.weight"] if tied else []))
    with pytest.raises(RuntimeError, match="not run as a whole"):
        held(ids)


def test_stage_layer_range():
    assert [list(stage_layer_range(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(stage_layer_range(4, 4, s)) for s in range(4)] == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match=r"num_layers=2 is smaller than parallelism\.language\.pp=3"):
        stage_layer_range(2, 3, 0)


def test_init_is_deterministic_and_seed_dependent():
    _, a = _model()
    _, b = _model()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    c = MimoModel(_cfg().model, IMG)
    c.init_weights(8)
    assert not torch.equal(a.language.model.embed_tokens.weight, c.language.model.embed_tokens.weight)
    assert not torch.equal(
        a.vision.multi_modal_projector.linear_1.weight, c.vision.multi_modal_projector.linear_1.weight
    )


def test_hf_parameter_names():
    _, m = _model()
    names = {n for n, _ in m.named_parameters()}
    for n in [
        "language.model.embed_tokens.weight",
        "language.model.layers.0.self_attn.q_proj.weight",
        "language.model.layers.1.mlp.gate_proj.weight",
        "language.model.norm.weight",
        "language.lm_head.weight",
        "vision.vision_model.embeddings.patch_embedding.weight",
        "vision.vision_model.encoder.layers.0.self_attn.out_proj.weight",
        "vision.vision_model.post_layernorm.weight",
        "vision.multi_modal_projector.linear_2.weight",
    ]:
        assert n in names, n


def test_packed_rows_compute_every_document_as_if_alone():
    """THD packing: the logits of each packed document equal those of the document run on its own (per-document
    RoPE positions, attention never crossing documents, padding never attended by real tokens)."""
    from _tiny import first_global_batch, tiny_config_dict
    from mimo_titan.data import ImageTextProcessor

    one = {"rank_offset": 0, "num_ranks": 1}
    cfg = config_from_dict(
        tiny_config_dict(one, one, data={"packing": True, "max_images_per_sample": 2}, training={"seq_len": 120})
    )
    P = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    proc = ImageTextProcessor(cfg.data.tokenizer, cfg.model.vision.image_size, P)
    batch = first_global_batch(cfg, proc)
    model = MimoModel(cfg.model, proc.image_token_id)
    model.init_weights(3)
    with torch.no_grad():
        packed = model(batch.input_ids, batch.pixel_values, batch.position_ids, batch.doc_ids)
        image = 0
        checked = 0
        for r in range(len(batch)):
            cu, cu_real = batch.cu_seqlens[r].tolist(), batch.cu_seqlens_unpadded[r].tolist()
            for d in range(len(batch.sample_ids[r])):
                start, n = cu[d], cu_real[d + 1] - cu_real[d]
                ids = batch.input_ids[r : r + 1, start : start + n]
                k = int((ids == proc.image_token_id).sum()) // P
                alone = model(ids, batch.pixel_values[image : image + k])
                image += k
                torch.testing.assert_close(packed[r : r + 1, start : start + n], alone, atol=2e-5, rtol=0)
                checked += 1
    assert image == batch.pixel_values.shape[0]
    assert checked > len(batch)  # some row holds several documents


def test_patch_embedding_equals_the_strided_convolution():
    """The ViT patchifies + projects (for tensor parallelism); that must equal HF's stride-p Conv2d on its weights."""
    cfg, m = _model()
    emb = m.vision.vision_model.embeddings
    x = torch.randn(3, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
    conv = emb.patch_embedding(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(emb(x), conv + emb.position_embedding.weight, atol=1e-5, rtol=0)


@pytest.mark.parametrize("theta,head_dim", [(500000.0, 64), (10000.0, 16)])
def test_llama3_rope_scaling_matches_transformers(theta, head_dim):
    """cos / sin of ``model.language.rope_scaling = {type = "llama3", ...}`` equal transformers'
    ``LlamaRotaryEmbedding`` with the same ``rope_scaling`` (Llama 3.1's long-context RoPE); plain RoPE differs."""
    transformers = pytest.importorskip("transformers")
    from mimo_titan.config import RopeScalingConfig
    from mimo_titan.models.decoder import rope_cos_sin

    # a short original context puts frequencies in all three bands (kept, blended, stretched) for both head dims
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    hf_cfg = transformers.LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_theta=theta,
        rope_scaling={"rope_type": "llama3", **scaling},
    )
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    pos = torch.tensor([[0, 1, 7, 63, 64, 500, 4095], [3, 2, 1, 0, 9, 100, 2048]])
    x = torch.zeros(1, dtype=torch.float32)
    cos_ref, sin_ref = rope(x, pos)
    ours = RopeScalingConfig(type="llama3", **scaling)
    cos, sin = rope_cos_sin(pos, head_dim, theta, torch.float32, ours)
    torch.testing.assert_close(cos, cos_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=1e-6, rtol=0)
    plain_cos, _ = rope_cos_sin(pos, head_dim, theta, torch.float32)
    assert (plain_cos - cos_ref).abs().max() > 0.1  # the scaling matters at these positions
    torch.testing.assert_close(rope_cos_sin(pos, head_dim, theta, torch.float32, RopeScalingConfig())[0], plain_cos)
