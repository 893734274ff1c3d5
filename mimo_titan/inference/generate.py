"""Autoregressive generation of captions / transcripts with a single-process :class:`~mimo_titan.models.MimoModel`.

Prefill: the encoders run once on the prompts' media, their rows are merged at the placeholders
(:meth:`MimoModel.encode`, :func:`~mimo_titan.models.mimo.merge_image_embeddings`, as the training forward does) and
the language model reads the prompt into a :class:`~mimo_titan.models.kv_cache.KVCache`. Decode: one token per step
through the cache. Without the cache (``use_cache=False``, the reference) every step reruns the whole model on the
prompt and the tokens so far.

A row stops at the first layout token (EOS, and also any placeholder, begin / end marker, pad or BOS: a model
trained with several images per sample ends a caption with ``<|begin_of_image|>``), which is not part of the result,
or after ``max_new_tokens``. Generation never makes the model read more than ``training.seq_len`` positions (the
longest sequence it was trained on): at most ``seq_len - P + 1`` tokens follow a prompt of P tokens. Only tokens of
the tokenizer can be chosen (the model's vocabulary may be larger).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mimo_titan.data.collate import pad_clips
from mimo_titan.inference.sampling import SamplingParams, next_tokens
from mimo_titan.models.kv_cache import KVCache
from mimo_titan.models.mimo import merge_image_embeddings
from mimo_titan.models.specs import encoder_spec

if TYPE_CHECKING:
    from mimo_titan.config import ModelConfig
    from mimo_titan.data.processor import ImageTextProcessor
    from mimo_titan.inference.prompt import Prompt
    from mimo_titan.models.mimo import MimoModel

__all__ = ["generate_tokens", "generate_texts", "prompt_encoder_inputs"]


def prompt_encoder_inputs(
    model_cfg: ModelConfig, prompts: Sequence[Prompt], device: torch.device
) -> dict[str, tuple[torch.Tensor, ...] | None]:
    """Every encoder's forward arguments for ``prompts`` (in prompt order): ``(pixel_values [B, 3, H, W],)`` for an
    image encoder; ``(features [N, M, F_max], frames [N])`` of the N prompts with a clip (zero-padded,
    :func:`~mimo_titan.data.collate.pad_clips`) for an audio encoder, None when no prompt has one."""
    out: dict[str, tuple[torch.Tensor, ...] | None] = {}
    for name, section in model_cfg.encoders.items():
        media = encoder_spec(section.type).media
        if media == "image":
            out[name] = (torch.cat([p.pixel_values for p in prompts]).to(device),)
        else:
            clips = [p.audio_features for p in prompts if p.audio_features is not None]
            if clips:
                features, frames = pad_clips(clips, mel_bins=int(clips[0].shape[0]))
                out[name] = (features.to(device), frames.to(device))
            else:
                out[name] = None
    return out


@torch.no_grad()
def generate_tokens(
    model: MimoModel,
    model_cfg: ModelConfig,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    *,
    stop_ids: Sequence[int],
    max_positions: int,
    allowed_V: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Generate after each of ``prompts`` (one batch: every prompt of the same length P).

    Args:
        model: the model, in eval mode, on its device.
        model_cfg: its config (which encoder takes which medium).
        prompts: the prompts (``B >= 1``), all of the same length.
        params: how many tokens and how to choose them (:mod:`mimo_titan.inference.sampling`).
        stop_ids: tokens that end a row (not included in its result).
        max_positions: the most positions the model may read (``training.seq_len``).
        allowed_V: optional ``[V]`` bool on the model's device, the tokens that may be chosen.
        generator: the sampling generator (on the model's device); unused when greedy.
        use_cache: decode through a KV cache (else rerun the model on the whole sequence every step).

    Returns:
        The generated token ids of every prompt, without the stop token.

    Raises:
        ValueError: prompts of different lengths, or a prompt longer than ``max_positions``.
    """
    lengths = {len(p.input_ids) for p in prompts}
    if len(lengths) != 1:
        raise ValueError(f"generate_tokens takes prompts of one length (a batch), got lengths {sorted(lengths)}")
    prompt_len = lengths.pop()
    if prompt_len > max_positions:
        raise ValueError(
            f"a prompt of {prompt_len} tokens is longer than the {max_positions} positions the model reads"
        )
    steps = min(params.max_new_tokens, max_positions - prompt_len + 1)
    device = next(model.parameters()).device
    ids = torch.tensor([p.input_ids for p in prompts], dtype=torch.int64, device=device)
    enc = prompt_encoder_inputs(model_cfg, prompts, device)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.int64, device=device)
    lm = model.lm
    cache: KVCache | None = None
    if use_cache:
        cache = KVCache(prompt_len + steps)
        dense = model.encode(ids, encoder_inputs=enc)
        embeds = lm.embed(ids)
        if dense is not None:
            embeds = merge_image_embeddings(embeds, ids, dense, tuple(model.placeholder_ids.values()))
        logits = lm(ids, inputs_embeds=embeds, kv_cache=cache)[:, -1]
    else:
        logits = model(ids, encoder_inputs=enc)[:, -1]
    out = torch.empty(len(prompts), 0, dtype=torch.int64, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(steps):
        token = next_tokens(logits, params, generator, allowed_V)
        out = torch.cat([out, token[:, None]], dim=1)
        done |= torch.isin(token, stops)
        if step + 1 == steps or bool(done.all()):
            break
        if cache is not None:
            logits = lm(token[:, None], kv_cache=cache)[:, -1]
        else:
            logits = model(torch.cat([ids, out], dim=1), encoder_inputs=enc)[:, -1]
    results = []
    stop_set = set(stop_ids)
    for row in out.tolist():
        stop_at = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        results.append(row[:stop_at])
    return results


def generate_texts(
    model: MimoModel,
    model_cfg: ModelConfig,
    processor: ImageTextProcessor,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    *,
    max_positions: int,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[str]:
    """The text generated after each prompt, in order: prompts of equal length run together, ``batch_size`` at most
    per batch (in order of first appearance). Stops at every layout token of ``processor``; chooses only tokens of
    its tokenizer. ``generator``: the sampling generator (default: one on the model's device seeded with
    ``params.seed``).

    Raises:
        ValueError: ``batch_size < 1``; a prompt longer than ``max_positions``.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be >= 1")
    device = next(model.parameters()).device
    vocab = model_cfg.language.vocab_size
    allowed = torch.arange(vocab, device=device) < processor.vocab_size
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p.input_ids), []).append(i)
    texts: list[str | None] = [None] * len(prompts)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            tokens = generate_tokens(
                model,
                model_cfg,
                [prompts[i] for i in chunk],
                params,
                stop_ids=sorted(processor.layout_token_ids),
                max_positions=max_positions,
                allowed_V=allowed,
                generator=generator,
                use_cache=use_cache,
            )
            for i, t in zip(chunk, tokens):
                texts[i] = processor.decode(t)
    return [t if t is not None else "" for t in texts]
