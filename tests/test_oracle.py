"""The oracle: one distributed optimizer step equals one single-process step on the same global batch.

For each layout (colocated, non-colocated equal DP, fan-in, fan-out, a non-dividing DP ratio, LM pp=2, HSDP,
samples with no image, MoE with expert parallelism: ep = 2 / 4, ep × etp, ep with FSDP over edp, ep inside
pp, an MoE encoder; context parallelism cp = 2 / 4; tensor + sequence parallelism tp = 2 for the LM (also with
Qwen3's q / k norms) and the encoder, tp × cp, pp × tp × cp; packed THD rows under cp, tp × cp and pp × tp; word
embeddings tied across LM pipeline stages, whose two copies must stay bit-identical; activation checkpointing
"full" / "selective", ``compile`` and explicit ``fsdp_reshard_after_forward`` on some of them, MoE / EP / CP / TP
included): the loss (1e-4), the global gradient norm before clipping (1e-4 relative; AdamW's first update is nearly
invariant to a gradient scale, so this is what catches a wrong reduction) and every updated parameter (1e-3, fp32) equal
those of a plain ``MimoModel`` + cross-entropy + ``clip_grad_norm_`` + ``AdamW`` in this process
(``tests/_reference.py``), together with the MoE routing counts and aux loss.
"""

from __future__ import annotations

import os

import pytest
import torch

from _launch import per_layout_backends, run_ranks
from _tiny import SHARED, first_global_batch, tiny_config_dict

V = lambda off, n, **kw: dict(rank_offset=off, num_ranks=n, **kw)  # noqa: E731
OPTIONS = ("activation_checkpointing", "compile", "fsdp_reshard_after_forward")  # the options of a layout table
MOE_LM = {
    "model": {
        "language": {
            "moe": {
                "num_experts": 4,
                "top_k": 2,
                "intermediate_size": 32,
                "shared_expert_intermediate_size": 16,
                "aux_loss_coeff": 0.05,
            }
        }
    }
}
MOE_BOTH = {
    "model": {
        "language": MOE_LM["model"]["language"],  # the encoder has 2 experts, the LM 4
        "vision": {
            "moe": {"num_experts": 2, "top_k": 1, "intermediate_size": 32, "first_layer": 1, "aux_loss_coeff": 0.5}
        },
    }
}

PACKED = {"data": {"packing": True}, "training": {"seq_len": 120}}
AUDIO = {  # a Whisper-style encoder on the spoken captions: 2-5 s clips -> 5-17 LM tokens (pool 16)
    "type": "audio",
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 64,
    "projector_intermediate_size": 64,
    "pool": 16,
    "max_source_positions": 300,
}


def with_audio(audio_layout: dict, **sections) -> dict:
    """Config sections adding the audio encoder on ``audio_layout`` and the speech shard (image + wav + caption)."""
    out = {
        "model": {"audio": AUDIO},
        "parallelism": {"audio": audio_layout},
        "data": {"path": str(SHARED / "speech" / "cc12m-speech-0000.tar")},
        "training": {"seq_len": 64},
    }
    for key, value in sections.items():
        out[key] = {**out.get(key, {}), **value}
    return out


TIED = {"model": {"language": {"tie_word_embeddings": True}}}
EMBED, HEAD = "language.model.embed_tokens.weight", "language.lm_head.weight"

LAYOUTS = {
    # name: (world, vision layout, language layout, extra config sections, samples whose images are removed)
    # per-module options: activation checkpointing (full / selective), explicit FSDP resharding after forward
    "colocated_dp2": (  # compile = true: torch.compile per block (aot_eager here, see _build_on_meta)
        2,
        V(0, 2, dp_shard=2, activation_checkpointing="full", compile=True),
        V(0, 2, dp_shard=2, activation_checkpointing="selective", compile=True),
        {},
        (),
    ),
    "equal_dp_2to2_hsdp": (
        4,
        V(0, 2, dp_shard=2, activation_checkpointing="selective", fsdp_reshard_after_forward=True),
        V(2, 2, dp_replicate=2, activation_checkpointing="full"),
        {},
        (),
    ),
    "hsdp_2x2": (
        6,
        V(0, 2, dp_shard=2),
        V(2, 4, dp_replicate=2, dp_shard=2),
        {"training": {"global_batch_size": 8}},
        (),
    ),
    "fan_in_4to2": (
        6,
        V(0, 4, dp_shard=4),
        V(4, 2, dp_shard=2),
        {"training": {"global_batch_size": 8}, "data": {"max_images_per_sample": 2}},
        (),
    ),
    "fan_in_4to2_rank_without_images": (
        6,
        V(0, 4, dp_shard=4),
        V(4, 2, dp_shard=2),
        {"training": {"global_batch_size": 8}, "data": {"max_images_per_sample": 2}},
        (0, 1, 4, 5),
    ),
    "fan_out_1to3": (
        4,
        V(0, 1),
        V(1, 3, dp_shard=3),
        {"training": {"global_batch_size": 6}, "data": {"max_images_per_sample": 2}},
        (),
    ),
    "ratio_2to3": (
        5,
        V(0, 2, dp_shard=2),
        V(2, 3, dp_shard=3),
        {"training": {"global_batch_size": 12}, "data": {"max_images_per_sample": 2}},
        (0, 1, 2, 7),
    ),
    "lm_pp2_dp2_gpipe": (
        5,
        V(0, 1),
        V(1, 4, pp=2, dp_shard=2, fsdp_reshard_after_forward=False),
        {"training": {"global_batch_size": 8, "microbatches": 4}, "parallelism": {"pipeline_schedule": "GPipe"}},
        (),
    ),
    "lm_pp2_1f1b_clip_no_images": (
        4,
        V(0, 2, dp_shard=2),
        V(2, 2, pp=2),
        {"training": {"max_grad_norm": 0.05, "microbatches": 2}},
        (0, 1, 2, 3),
    ),
    # full activation checkpointing re-runs the expert all-to-all (and the routing) in the backward; the routing
    # counts and aux loss are counted once (selective: the MoE layers of moe_encoder_rank_without_images)
    "moe_colocated_ep2": (
        2,
        V(0, 2, dp_shard=2),
        V(0, 2, dp_shard=2, ep=2, activation_checkpointing="full", fsdp_reshard_after_forward=True),
        MOE_LM,
        (),
    ),
    "moe_ep4": (5, V(0, 1), V(1, 4, dp_shard=4, ep=4), {**MOE_LM, "training": {"global_batch_size": 8}}, ()),
    "moe_ep2_etp2": (
        5,
        V(0, 1),
        V(1, 4, dp_shard=4, ep=2, etp=2, activation_checkpointing="full"),
        {**MOE_LM, "training": {"global_batch_size": 8}},
        (),
    ),
    "moe_ep2_edp2_fsdp": (5, V(0, 1), V(1, 4, dp_shard=4, ep=2), {**MOE_LM, "training": {"global_batch_size": 8}}, ()),
    "moe_pp2_ep2_noncolocated": (5, V(0, 1), V(1, 4, pp=2, dp_shard=2, ep=2), MOE_LM, ()),
    "moe_encoder_ep2_aux_free": (
        4,
        V(0, 2, dp_shard=2, ep=2, activation_checkpointing="full"),
        V(2, 2, dp_shard=2, ep=2, activation_checkpointing="full"),
        {
            "model": {
                "language": MOE_BOTH["model"]["language"],
                "vision": {"moe": {**MOE_BOTH["model"]["vision"]["moe"], "load_balance": "aux_free"}},
            },
            "training": {"microbatches": 1},
        },
        (),
    ),
    "lm_cp2_noncolocated": (3, V(0, 1), V(1, 2, cp=2, activation_checkpointing="full"), {}, ()),
    "lm_cp2_dp2_fan_in": (
        6,
        V(0, 2, dp_shard=2),
        V(2, 4, dp_shard=2, cp=2),
        {"data": {"max_images_per_sample": 2}},
        (1,),
    ),
    "lm_pp2_cp2_colocated": (4, V(0, 4, dp_shard=4), V(0, 4, pp=2, cp=2), {"training": {"global_batch_size": 8}}, ()),
    "moe_cp2_ep2": (5, V(0, 1), V(1, 4, dp_shard=2, cp=2, ep=2), MOE_LM, ()),
    "lm_cp2_images_on_every_shard": (3, V(0, 1), V(1, 2, cp=2), {"data": {"max_images_per_sample": 2}}, ()),
    "lm_cp4_colocated_images_on_every_shard": (
        4,
        V(0, 4, dp_shard=4),
        V(0, 4, cp=4),
        {"training": {"global_batch_size": 8}},
        (),
    ),
    "lm_tp2_noncolocated": (3, V(0, 1), V(1, 2, tp=2, activation_checkpointing="selective"), {}, ()),
    "lm_tp2_qk_norm": (3, V(0, 1), V(1, 2, tp=2), {"model": {"language": {"qk_norm": True}}}, ()),  # Qwen3 q/k norms
    # 9 patches per image (48 / 16 = 3 per side): the encoder pads its patch sequence to 10 for tp = 2
    "vision_tp2_lm_tp2_cp2": (6, V(0, 2, tp=2), V(2, 4, cp=2, tp=2), {"model": {"vision": {"image_size": 48}}}, ()),
    "vision_tp2_fan_out_lm_dp2_tp2": (
        6,
        V(0, 2, tp=2),
        V(2, 4, dp_shard=2, tp=2),
        {"data": {"max_images_per_sample": 2}},
        (1,),
    ),
    "lm_pp2_tp2_cp2_colocated": (
        8,
        V(0, 8, dp_shard=4, tp=2),
        V(0, 8, pp=2, cp=2, tp=2),
        {"training": {"global_batch_size": 8}},
        (),
    ),
    # packed THD rows of 120 tokens: 2-3 documents per row, attention never crosses them
    "packed_lm_cp2": (
        3,
        V(0, 1),
        V(1, 2, cp=2),
        {**PACKED, "data": {**PACKED["data"], "max_images_per_sample": 2}},
        (),
    ),
    "packed_vision_tp2_lm_tp2_cp2": (6, V(0, 2, tp=2), V(2, 4, cp=2, tp=2), PACKED, ()),
    "packed_lm_pp2_dp2_tp2": (9, V(0, 1), V(1, 8, pp=2, dp_shard=2, tp=2), PACKED, ()),
    "moe_encoder_rank_without_images": (
        6,
        V(0, 4, dp_shard=4, activation_checkpointing="selective"),
        V(4, 2, dp_shard=2, activation_checkpointing="selective"),
        {**MOE_BOTH, "training": {"global_batch_size": 8}},
        (0, 1, 4, 5),
    ),
    # the cross-module schedule: the encoder leads the LM stages microbatch by microbatch (1F1B, warm-up pp + 1)
    "streamed_lm_pp2_m6_steady_state": (
        4,
        V(0, 2, dp_shard=2),
        V(2, 2, pp=2, activation_checkpointing="full"),
        {"training": {"global_batch_size": 12, "microbatches": 6}, "data": {"max_images_per_sample": 2}},
        (3, 7),
    ),
    "streamed_lm_pp3_fan_out_1to2": (
        7,
        V(0, 1),
        V(1, 6, pp=3, dp_shard=2),
        {"model": {"language": {"num_layers": 3}}, "training": {"global_batch_size": 8, "microbatches": 4}},
        (),
    ),
    "streamed_lm_pp4": (
        5,
        V(0, 1),
        V(1, 4, pp=4),
        {"model": {"language": {"num_layers": 4}}, "training": {"global_batch_size": 8, "microbatches": 8}},
        (5,),
    ),
    "streamed_lm_pp2_gpipe_encoder_warmup_all": (
        4,
        V(0, 2, dp_shard=2),
        V(2, 2, pp=2),
        {"training": {"global_batch_size": 8, "microbatches": 4}, "parallelism": {"pipeline_schedule": "GPipe"}},
        (),
    ),
    "module_gpipe_lm_pp2_dp2": (
        5,
        V(0, 1),
        V(1, 4, pp=2, dp_shard=2),
        {"training": {"global_batch_size": 8, "microbatches": 4}, "parallelism": {"module_schedule": "GPipe"}},
        (),
    ),
    # virtual pipeline stages (Interleaved1F1B): LM pp rank r holds chunks r and r + pp of a pp·2-way layer split
    "interleaved_lm_pp2_v2": (
        3,
        V(0, 1),
        V(1, 2, pp=2),
        {
            "model": {"language": {"num_layers": 4}},
            "parallelism": {"pipeline_schedule": "Interleaved1F1B", "virtual_stages": 2},
            "training": {"global_batch_size": 8, "microbatches": 8},  # the encoder warms up with 4 of 8
            "data": {"max_images_per_sample": 2},
        },
        (2,),
    ),
    # tied embeddings: chunk 0 (rank 0) and chunk 3 (rank 1) hold the copies; MoE layers in both chunks of a rank
    "interleaved_lm_pp2_v2_tied_moe_dp2": (
        5,
        V(0, 1),
        V(1, 4, pp=2, dp_shard=2),
        {
            "model": {"language": {**MOE_LM["model"]["language"], "num_layers": 4, "tie_word_embeddings": True}},
            "parallelism": {"pipeline_schedule": "Interleaved1F1B", "virtual_stages": 2},
            "training": {"global_batch_size": 8, "microbatches": 4},
        },
        (),
    ),
    "interleaved_lm_pp4_v2": (
        5,
        V(0, 1),
        V(1, 4, pp=4),
        {
            "model": {"language": {"num_layers": 8}},
            "parallelism": {"pipeline_schedule": "Interleaved1F1B", "virtual_stages": 2},
            "training": {"global_batch_size": 8, "microbatches": 8},
        },
        (),
    ),
    # tied word embeddings across LM stages: stage 0's embedding and the last stage's head sum their gradients
    "tied_lm_pp2": (3, V(0, 1), V(1, 2, pp=2), {**TIED, "training": {"microbatches": 2}}, ()),
    "tied_lm_pp2_dp2": (5, V(0, 1), V(1, 4, pp=2, dp_shard=2), {**TIED, "training": {"microbatches": 2}}, ()),
    "tied_lm_pp3_hsdp_clip": (  # a middle stage without a copy; clipping active (the norm counts the tie once)
        7,
        V(0, 1),
        V(1, 6, pp=3, dp_replicate=2),
        {
            "model": {"language": {"tie_word_embeddings": True, "num_layers": 3}},
            "training": {"global_batch_size": 8, "microbatches": 4, "max_grad_norm": 0.05},
        },
        (),
    ),
    "colocated_inline_dp2": (
        2,
        V(0, 2, dp_shard=2),
        V(0, 2, dp_shard=2),
        {"parallelism": {"colocated_encoders": "inline"}, "training": {"microbatches": 2}},
        (2,),
    ),
    "colocated_inline_fan_in_cp2": (
        4,
        V(0, 4, dp_shard=4),
        V(0, 4, dp_shard=2, cp=2),
        {"parallelism": {"colocated_encoders": "inline"}, "training": {"global_batch_size": 8}},
        (),
    ),
    # encoder pipeline stages: the encoder's stages lead the LM's in one 1F1B (warm-ups 4, 3 | 2, 1)
    "encoder_pp2_lm_pp2": (
        4,
        V(0, 2, pp=2),
        V(2, 2, pp=2),
        {"training": {"global_batch_size": 8, "microbatches": 4}, "data": {"max_images_per_sample": 2}},
        (1, 6),
    ),
    "encoder_pp2_dp2_fan_out_lm_dp3": (
        7,
        V(0, 4, pp=2, dp_shard=2),
        V(4, 3, dp_shard=3),
        {"training": {"global_batch_size": 12, "microbatches": 2}},
        (),
    ),
    "encoder_pp2_frozen_lm_pp2": (
        4,
        V(0, 2, pp=2),
        V(2, 2, pp=2),
        {"model": {"vision": {"frozen": True}}, "training": {"global_batch_size": 8, "microbatches": 4}},
        (),
    ),
    "encoder_pp2_module_gpipe": (
        4,
        V(0, 2, pp=2),
        V(2, 2, pp=2),
        {"parallelism": {"module_schedule": "GPipe"}, "training": {"global_batch_size": 8, "microbatches": 4}},
        (2,),
    ),
    "encoder_pp2_moe_ep2_colocated_batch": (
        4,
        V(0, 4, pp=2, dp_shard=2, ep=2),
        V(0, 4, pp=2, dp_shard=2),
        {
            "model": {"vision": MOE_BOTH["model"]["vision"]},
            "training": {"global_batch_size": 8, "microbatches": 2},
        },
        (0, 1),
    ),
    # frozen modules: no gradient, no optimizer state, bit-identical weights; the bridge sends no gradient back
    "frozen_vision_streamed_prefetch2": (
        4,
        V(0, 2, dp_shard=2),
        V(2, 2, pp=2),
        {"model": {"vision": {"frozen": True}}, "training": {"global_batch_size": 8, "microbatches": 4}},
        (5,),
    ),
    "frozen_vision_colocated_batch": (  # a frozen encoder under activation checkpointing: forwards without grad
        2,
        V(0, 2, dp_shard=2, activation_checkpointing="full"),
        V(0, 2, dp_shard=2),
        {"model": {"vision": {"frozen": True}}},
        (),
    ),
    "frozen_vision_colocated_inline": (
        2,
        V(0, 2, dp_shard=2),
        V(0, 2, dp_shard=2),
        {"model": {"vision": {"frozen": True}}, "parallelism": {"colocated_encoders": "inline"}},
        (),
    ),
    "projector_only_llava_stage1": (3, V(0, 1), V(1, 2, dp_shard=2), {"training": {"trainable": ["projector"]}}, ()),
    "frozen_language_pp2": (4, V(0, 2, dp_shard=2), V(2, 2, pp=2), {"model": {"language": {"frozen": True}}}, ()),
    # nothing on the first LM stage or in the encoder trains (the first stage's output carries no gradient)
    "only_the_last_lm_stage_trains_pp2": (
        4,
        V(0, 2, dp_shard=2),
        V(2, 2, pp=2),
        {"training": {"trainable": ["language.model.layers.1"]}},
        (),
    ),
    # two encoders (vision + audio), each with its own bridge; a variable number of audio tokens per sample
    "vision_audio_noncolocated_dp1_dp2_lm_dp2": (
        5,
        V(0, 1),
        V(3, 2, dp_shard=2),
        with_audio(V(1, 2, dp_shard=2, activation_checkpointing="full")),
        (),
    ),
    "vision_audio_colocated_lm_apart_microbatch_without_audio": (
        4,
        V(0, 2, dp_shard=2),
        V(2, 2, pp=2),
        with_audio(V(0, 2, dp_shard=2), training={"seq_len": 64, "global_batch_size": 4, "microbatches": 2}),
        (),
    ),
    "vision_audio_lm_all_colocated_inline": (
        2,
        V(0, 2, dp_shard=2),
        V(0, 2, dp_shard=2),
        with_audio(V(0, 2, dp_shard=2), parallelism={"audio": V(0, 2, dp_shard=2), "colocated_encoders": "inline"}),
        (3,),
    ),
    # vision in 2 pipeline stages, audio on its own rank, LM pp=2 x cp=2: audio rows reach both CP shards
    "vision_pp2_audio_apart_lm_pp2_cp2": (
        7,
        V(0, 2, pp=2),
        V(3, 4, pp=2, cp=2),
        with_audio(V(2, 1), training={"seq_len": 64, "global_batch_size": 8, "microbatches": 4}),
        (),
    ),
    # a frozen audio encoder prefetching beside a trainable vision encoder; LM tp=2
    "frozen_audio_vision_trains_lm_tp2": (
        4,
        V(0, 1),
        V(2, 2, tp=2),
        with_audio(V(1, 1), model={"audio": {**AUDIO, "frozen": True}}),
        (),
    ),
    # two frozen encoders on one rank (one leading stage, forwards only, 2 microbatches ahead of the LM): each lane
    # waits for its own sends (a send waited for by another lane's bridge was waited for twice: a hang on gloo)
    "two_frozen_encoders_share_a_rank_prefetch": (
        3,
        V(0, 1),
        V(1, 2, dp_shard=2),
        with_audio(
            V(0, 1),
            model={"audio": {**AUDIO, "frozen": True}, "vision": {"frozen": True}},
            training={"seq_len": 64, "global_batch_size": 8, "microbatches": 4},
        ),
        (),
    ),
    # vision on the LM's ranks (whole batch), audio on a rank of its own (streamed): each encoder in its own mode
    "vision_with_lm_audio_apart_mixed_modes": (3, V(0, 2, dp_shard=2), V(0, 2, dp_shard=2), with_audio(V(2, 1)), ()),
    # both encoders lead an interleaved language pipeline (warm-up 4 of 8 for pp = 2, v = 2)
    "vision_audio_interleaved_lm_pp2_v2": (
        4,
        V(0, 1),
        V(2, 2, pp=2),
        with_audio(
            V(1, 1),
            model={"audio": AUDIO, "language": {"num_layers": 4}},
            parallelism={"audio": V(1, 1), "pipeline_schedule": "Interleaved1F1B", "virtual_stages": 2},
            training={"seq_len": 64, "global_batch_size": 8, "microbatches": 8},
        ),
        (),
    ),
    "tied_lm_pp2_trains_only_the_tied_weight": (
        3,
        V(0, 1),
        V(1, 2, pp=2),
        {
            "model": {"language": {"tie_word_embeddings": True}, "vision": {"frozen": True}},
            "training": {"trainable": ["embed_tokens"]},
        },
        (),
    ),
}


# layouts whose given samples lose their audio clips (a microbatch without any audio)
NO_AUDIO = {"vision_audio_colocated_lm_apart_microbatch_without_audio": (0, 1)}

# layouts whose batches are rotated so image tokens reach every CP rank (the bridge sums their gradients)
ROLL = {"lm_cp2_images_on_every_shard": 14, "lm_cp4_colocated_images_on_every_shard": 9}


def _drop_items(ids, per_sample, token, samples):
    """The given samples lose their items (images or clips) of placeholder ``token``: their placeholders become a
    text token. Returns the new ids, the new per-sample counts and the indices of the items kept."""
    ids, counts = ids.clone(), per_sample.clone()
    first = [0, *torch.cumsum(per_sample, 0).tolist()]
    keep = []
    for s in range(len(ids)):
        if s in samples:
            ids[s][ids[s] == token] = 100
            counts[s] = 0
        else:
            keep.extend(range(first[s], first[s + 1]))
    return ids, counts, keep


def _batch(cfg, processor, no_image_samples, roll=0, no_audio_samples=()):
    """The first global batch; the given samples lose their images (placeholders become text tokens) or their
    audio clips; with ``roll`` every row (ids and labels together) is rotated by that many positions, which moves
    the image tokens onto other context-parallel shards and across shard boundaries."""
    from dataclasses import replace

    from mimo_titan.data.collate import pad_clips

    b = first_global_batch(cfg, processor)
    if no_audio_samples:
        ids, clips, keep = _drop_items(b.input_ids, b.clips_per_sample, processor.audio_token_id, no_audio_samples)
        feats, frames = pad_clips([b.audio_features[i, :, : b.audio_frames[i]] for i in keep])
        b = replace(b, input_ids=ids, audio_features=feats, audio_frames=frames, clips_per_sample=clips)
    if roll:
        b = replace(b, input_ids=b.input_ids.roll(roll, 1), labels=b.labels.roll(roll, 1))
    if not no_image_samples:
        return b
    ids, ims, keep = _drop_items(b.input_ids, b.images_per_sample, processor.image_token_id, no_image_samples)
    return replace(b, input_ids=ids, pixel_values=b.pixel_values[keep], images_per_sample=ims)


def _build_on_meta(cfg, device):
    """``build_job``, checking that the rank builds the full model on the meta device only (never with memory), holds
    exactly the modules of its role, and has no tensor left on meta."""
    from mimo_titan.models.mimo import MimoModel
    from mimo_titan.train.trainer import build_job

    devices, init = [], MimoModel.__init__

    def spy(self, *args, **kwargs):
        devices.append(torch.empty(()).device.type)  # the default device the model's tensors are built on
        init(self, *args, **kwargs)

    MimoModel.__init__ = spy  # type: ignore[method-assign]
    # layouts with compile = true trace every block with dynamo and AOT autograd, without inductor's code generation
    # (tens of seconds per process on this CPU; tests/test_module_options.py compares compiled blocks with eager)
    os.environ.setdefault("MIMO_TITAN_COMPILE_BACKEND", "aot_eager")
    try:
        job = build_job(cfg, device)
    finally:
        MimoModel.__init__ = init  # type: ignore[method-assign]
    assert devices and set(devices) == {"meta"}, devices
    assert set(job.modules) == {n for n in job.topology.layouts if job.topology.role.holds(n)}
    for name, module in job.modules.items():
        left = [k for k, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        assert not left, f"{name}: {left}"
    return job


def _oracle_worker(rank, world, device, cfg_dict, no_image_samples):
    from torch.distributed.tensor import DTensor

    import kernels
    from mimo_titan.config import config_from_dict
    from mimo_titan.train.trainer import canonical_named_parameters, train_step, validate

    cfg = config_from_dict(cfg_dict)
    job = _build_on_meta(cfg, device)
    no_image_samples, roll, no_audio = no_image_samples
    batch = _batch(cfg, job.processor, no_image_samples, roll, no_audio)
    kernels.reset_dispatch_counts()
    # validation first (forward only through the same layout): it must leave the training step below exact
    val = validate(job, [batch])
    rec = train_step(job, batch)
    params = {}
    for name, p in canonical_named_parameters(job):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        params[name] = full.detach().cpu()
    return {
        "val_loss": val["loss"],
        "loss": rec["loss"],
        "grad_norm": rec["grad_norm"],
        "params": params,
        "moe": rec.get("moe"),
        "kernels": kernels.dispatch_counts(),
        "lm_schedule": type(job.schedule.pp_schedule).__name__ if job.schedule.pp_schedule is not None else None,
        # parameters with optimizer state on this rank (frozen ones must have none)
        "optimized": sorted(
            name for name, p in canonical_named_parameters(job) if any(p in o.state for o in job.optimizers.values())
        ),
    }


def _reference_step(cfg, no_image_samples, roll, no_audio=()):
    from _reference import ReferenceTrainer
    from mimo_titan.train.trainer import build_processor

    proc = build_processor(cfg)
    batch = _batch(cfg, proc, no_image_samples, roll, no_audio)
    audio_id = proc.audio_token_id if proc.audio_tokens is not None else None
    ref = ReferenceTrainer(cfg, proc.image_token_id, audio_id)
    val_loss = ref.eval_loss([batch])
    loss, norm = ref.step(batch)
    trainable = {n for n, p in ref.model.named_parameters() if p.requires_grad}
    return (loss, val_loss), norm, ref.params(), batch, ref.moe_stats(), trainable


@pytest.mark.multirank
@pytest.mark.parametrize("layout,backend", per_layout_backends({k: v[0] for k, v in LAYOUTS.items()}))
def test_one_step_matches_single_process(layout, backend):
    _check_one_step(layout, backend)


# the layouts whose training step runs the Triton kernels on a GPU: MoE permutation with the EP all-to-all (ep, ep x
# etp, an MoE encoder under EP) and zigzag CP sharding (BSHD rows, packed THD rows)
TRITON_LAYOUTS = [
    "moe_colocated_ep2",
    "moe_ep2_etp2",
    "moe_encoder_ep2_aux_free",
    "lm_cp2_noncolocated",
    "packed_lm_cp2",
]


@pytest.mark.multirank
@pytest.mark.parametrize("layout,backend", per_layout_backends({k: LAYOUTS[k][0] for k in TRITON_LAYOUTS}))
def test_one_step_through_the_triton_kernels_matches_single_process(layout, backend):
    """The GPU code path on every machine: ``kernels.backend = "triton"`` runs the Triton kernels inside the
    training step (in Triton's interpreter on CPU) and the step still equals the single-process reference."""
    results = _check_one_step(layout, backend, kernels_backend="triton")
    for rank, res in enumerate(results):
        assert res["kernels"]["torch"] == 0, f"rank {rank} ran a torch reference op: {res['kernels']}"
    assert sum(res["kernels"]["triton"] for res in results) > 0  # (a rank of a module without kernels runs none)


def _check_one_step(layout, backend, kernels_backend="auto"):
    from mimo_titan.config import config_from_dict

    world, vision, language, extra, no_images = LAYOUTS[layout]
    cfg_dict = tiny_config_dict(vision, language, **extra, kernels={"backend": kernels_backend})
    cfg = config_from_dict(cfg_dict)
    roll, no_audio = ROLL.get(layout, 0), NO_AUDIO.get(layout, ())
    (ref_loss, ref_val), ref_norm, ref_params, batch, ref_moe, trainable = _reference_step(
        cfg, no_images, roll, no_audio
    )
    assert ref_val == pytest.approx(ref_loss, abs=1e-5)  # the same weights and batch: the training loss
    if cfg.data.max_images_per_sample > 1 or no_images:  # the layout moves a variable number of images per sample
        assert len(set(batch.images_per_sample.tolist())) > 1 or not int(batch.images_per_sample.sum())
    if cfg.data.packing:  # rows really hold several documents
        assert max(len(ids) for ids in batch.sample_ids) >= 2
    if no_audio:  # the layout really has a microbatch without any audio clip
        per_mb = batch.clips_per_sample.view(cfg.training.microbatches, -1).sum(1)
        assert 0 in per_mb.tolist() and per_mb.sum() > 0
    results = run_ranks(_oracle_worker, world, cfg_dict, (no_images, roll, no_audio), backend=backend)

    if cfg.parallelism.pipeline_schedule == "Interleaved1F1B":  # every LM rank ran torch's interleaved schedule
        assert {r["lm_schedule"] for r in results} - {None} == {"ScheduleInterleaved1F1B"}
    tied = cfg.model.language.tie_word_embeddings
    seen = set()
    for rank, res in enumerate(results):
        assert res["val_loss"] == pytest.approx(ref_val, abs=1e-4), f"rank {rank}"  # validation: forward only
        assert res["loss"] == pytest.approx(ref_loss, abs=1e-4), f"rank {rank}"
        assert res["grad_norm"] == pytest.approx(ref_norm, rel=1e-4), f"rank {rank}"
        for name, p in res["params"].items():
            ref_name = EMBED if tied and name == HEAD else name  # a last stage's copy of the one tied tensor
            if "experts.w_" in name and p.shape != ref_params[ref_name].shape:
                continue  # an expert-parallel slice; checked through the full tensors gathered below
            torch.testing.assert_close(p, ref_params[ref_name], atol=1e-3, rtol=0, msg=f"rank {rank} {name}")
            seen.add(ref_name)
    if tied:
        _check_tied_copies(results, cfg)
    _check_expert_slices(results, ref_params, LAYOUTS[layout], seen)
    assert seen == set(ref_params), f"parameters never checked: {sorted(set(ref_params) - seen)}"
    assert set(results[0]["moe"] or {}) == set(ref_moe)
    for rank, res in enumerate(results):  # routing counts (every token once) and aux loss equal the reference's
        for key, stats in (res["moe"] or {}).items():
            counts, aux = ref_moe[key]
            assert stats["tokens_per_expert"] == counts, f"rank {rank} {key}"
            assert stats["aux_loss"] == pytest.approx(aux, abs=1e-6), f"rank {rank} {key}"
    from mimo_titan.models import MimoModel

    init = MimoModel(cfg.model, 1998, audio_token_id=2020)
    init.init_weights(cfg.job.seed)
    initial = dict(init.named_parameters())
    lang = [n for n in initial if n.startswith("language.") and n in trainable] or sorted(trainable)
    moved = sum(float((initial[n].detach() - ref_params[n]).abs().max()) > 1e-5 for n in lang)
    assert moved > len(lang) // 2  # the step really changed the weights
    for module in {n.split(".")[0] for n in trainable}:  # every trainable module (each encoder) moved
        names = [n for n in trainable if n.startswith(module + ".")]
        assert any(float((initial[n].detach() - ref_params[n]).abs().max()) > 1e-6 for n in names), module
    # a last LM stage's copy of tied embeddings is the reference's one tensor
    tie = (
        {"language.lm_head.weight": "language.model.embed_tokens.weight"}
        if cfg.model.language.tie_word_embeddings
        else {}
    )
    for rank, res in enumerate(results):  # frozen: bit-identical, no optimizer state; the rest has optimizer state
        for name, p in res["params"].items():
            if tie.get(name, name) not in trainable:
                assert torch.equal(p, initial[tie.get(name, name)].detach()), f"rank {rank}: frozen {name} changed"
        optimized = {tie.get(n, n) for n in res["optimized"]}
        assert not optimized - trainable, f"rank {rank} keeps optimizer state of frozen parameters"
        assert {tie.get(n, n) for n in res["params"] if tie.get(n, n) in trainable} <= optimized | {
            n for n in res["params"] if "experts.w_" in n
        }, f"rank {rank}"
    return results


def _check_tied_copies(results, cfg):
    """Tied embeddings: after the step every rank's embedding and head (the first and the last LM stage's copies
    under pp > 1, one tensor under pp = 1) are bit-identical; with pp > 1 both kinds of copy were reported."""
    copies = {
        (r, name): res["params"][name]
        for r, res in enumerate(results)
        for name in (EMBED, HEAD)
        if name in res["params"]
    }
    (first_key, first), *others = copies.items()
    for key, value in others:
        assert torch.equal(value, first), f"rank {key[0]} {key[1]} differs from rank {first_key[0]} {first_key[1]}"
    if cfg.parallelism.language.pp > 1:
        assert {name for _, name in copies} == {EMBED, HEAD}


def _check_expert_slices(results, ref_params, layout, seen):
    """Under EP each rank holds experts [ep·L, (ep+1)·L) and width slice etp: stitch them and compare."""
    _, vision, language, *_ = layout
    from mimo_titan.topology import ModuleLayout

    for module, lay_kw in (("vision", vision), ("language", language)):
        sizes = {k: v for k, v in lay_kw.items() if k not in OPTIONS}
        lay = ModuleLayout(module, **sizes, is_language=module == "language")
        if lay.ep * lay.etp == 1:
            continue
        for name, ref in ref_params.items():
            if not (name.startswith(module + ".") and "experts.w_" in name):
                continue
            got = torch.full_like(ref, float("nan"))
            for rank, res in enumerate(results):
                if name not in res["params"] or res["params"][name].shape == ref.shape:
                    continue
                c = lay.expert_coordinate(rank)
                p = res["params"][name]
                L = p.shape[0]
                e = slice(c["ep"] * L, (c["ep"] + 1) * L)
                if name.endswith("w_down"):
                    w = p.shape[1]
                    got[e, c["etp"] * w : (c["etp"] + 1) * w, :] = p
                else:
                    w = p.shape[2]
                    got[e, :, c["etp"] * w : (c["etp"] + 1) * w] = p
            assert not got.isnan().any(), f"{name}: some expert slices never reported"
            torch.testing.assert_close(got, ref, atol=1e-3, rtol=0, msg=name)
            seen.add(name)
