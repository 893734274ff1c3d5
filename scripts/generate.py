"""Generate captions / transcripts with a trained MIMO model, in one process (the CPU or one CUDA GPU).

One sample (prints the generated text)::

    python scripts/generate.py --config CFG.toml --checkpoint DIR --image F.jpg [--audio F.wav] [--prompt TEXT]

A WebDataset shard (``<key>.jpg``/``.png`` + ``<key>.txt`` [+ ``<key>.wav``/``.flac``]; also a directory of
shards, a glob or a brace pattern, as ``data.path``), one JSON line per record ``{"key", "reference",
"generated"}`` (``reference``: the record's ``txt``, or null when it has none or an empty one)::

    python scripts/generate.py --config CFG.toml --checkpoint DIR --data SHARD.tar --out OUT.jsonl

Options: ``--max-new-tokens N`` (32), ``--temperature T`` (0: greedy), ``--top-p P`` (1), ``--seed S`` (0),
``--device auto|cpu|cuda`` (auto: CUDA when present), ``--batch-size B`` (16: prompts of equal length decoded
together), ``--hf``. Config overrides (``--section.key=value``) follow as in ``scripts/train.py``.

``--checkpoint`` is a training checkpoint ``step-N``, the checkpoint folder (its newest complete step), a
model-only checkpoint (``scripts/convert_hf.py import``), or an HF export directory (``scripts/convert_hf.py
export``): an export is recognised by ``DIR/<language module>/config.json``; ``--hf`` insists on one.

The prompt is a training sample's layout up to where its caption starts (image block, then the audio block for a
clip), then the ``--prompt`` text (in batch mode, the same text for every record); generation stops at the end of
text (or any other layout token), after ``--max-new-tokens`` tokens, or when the sequence reaches
``training.seq_len``. In batch mode, a record without an image, or whose media do not decode, is skipped with a
warning on stderr. A user error (config, checkpoint, media file, prompt length) prints one line ``error: ...`` and
exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn, TextIO

if TYPE_CHECKING:
    from mimo_titan.config import Config
    from mimo_titan.data.processor import ImageTextProcessor
    from mimo_titan.inference import Prompt

EXIT_USER_ERROR = 2


class _UsageError(Exception):
    """A command line that does not make sense (printed as ``error: ...``)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    text = (__doc__ or "").replace("``", "")
    p = _Parser(description=text, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the training TOML of the run")
    p.add_argument("--checkpoint", required=True, help="step-N, checkpoint folder, model-only checkpoint or HF export")
    p.add_argument("--hf", action="store_true", help="--checkpoint is an HF export (detected otherwise)")
    p.add_argument("--image", help="one image file (single mode)")
    p.add_argument("--audio", help="its audio clip, .wav or .flac (a model with an audio encoder)")
    p.add_argument("--prompt", help="text placed where the caption starts; the model continues it")
    p.add_argument("--data", help="a WebDataset shard (batch mode)")
    p.add_argument("--out", help="the JSONL file batch mode writes")
    p.add_argument("--max-new-tokens", type=int, default=32, help="most tokens generated per sample (32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling (1: every token)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present")
    p.add_argument("--batch-size", type=int, default=16, help="prompts of equal length decoded together (16)")
    return p


def _check_mode(args: argparse.Namespace) -> None:
    if (args.image is None) == (args.data is None):
        raise _UsageError("give one of --image (one sample) or --data SHARD.tar --out OUT.jsonl (a shard)")
    if args.data is not None:
        if args.out is None:
            raise _UsageError("--data needs --out OUT.jsonl (the file of generated lines)")
        if args.audio is not None:
            raise _UsageError("--audio goes with --image; in batch mode the shard's <key>.wav / .flac are used")
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            raise _UsageError(f"--out {args.out}: the directory {parent} does not exist")
    elif args.out is not None:
        raise _UsageError("--out goes with --data; with --image the text is printed")


def _single(args: argparse.Namespace, cfg: Config, device) -> None:
    from mimo_titan.inference import build_prompt, generate_texts, load_model, read_media

    image = read_media(args.image, "--image")
    audio = read_media(args.audio, "--audio") if args.audio is not None else None
    model, processor = load_model(cfg, args.checkpoint, device=device, hf=args.hf or None)
    ext = os.path.splitext(args.audio)[1].lstrip(".").lower() if args.audio else "wav"
    prompt = build_prompt(
        cfg,
        processor,
        image=image,
        image_source=f"--image {args.image}",
        audio=audio,
        audio_ext=ext,
        audio_source=f"--audio {args.audio}",
        text=args.prompt,
    )
    [text] = generate_texts(
        model, cfg.model, processor, [prompt], _params(args), max_positions=cfg.training.seq_len, batch_size=1
    )
    if not text.strip():
        print(
            "warning: the model generated nothing (its first token ended the caption: the end of text or a layout "
            "token); an undertrained model does this, train longer or check the checkpoint",
            file=sys.stderr,
        )
    print(text)


def _records(
    args: argparse.Namespace, cfg: Config, processor: ImageTextProcessor, skipped: list[str]
) -> Iterator[tuple[str, str | None, Prompt]]:
    """``(key, reference, prompt)`` of every usable record of ``--data``; the reasons of the skipped ones go to
    ``skipped`` (and stderr)."""
    from mimo_titan.data.loader import AUDIO_FIELDS, CAPTION_FIELD, IMAGE_FIELDS
    from mimo_titan.data.webdataset import iter_webdataset, resolve_shards
    from mimo_titan.errors import UserError
    from mimo_titan.inference import build_prompt

    for shard in resolve_shards(args.data):
        for key, fields in iter_webdataset([shard]):
            where = f"{shard}:{key}"
            image_field = next((f for f in IMAGE_FIELDS if f in fields), None)
            if image_field is None:
                skipped.append(f"{where}: no image ({'/'.join(IMAGE_FIELDS)})")
                print(f"warning: skipping {skipped[-1]}", file=sys.stderr)
                continue
            ref = fields.get(CAPTION_FIELD)
            # an empty caption is no reference either: null, which scripts/evaluate.py counts but does not score
            reference = (ref.decode("utf-8", errors="replace").strip() or None) if ref is not None else None
            audio_field = next((f for f in AUDIO_FIELDS if f in fields), None)
            if processor.audio_tokens is None:
                audio_field = None
            try:
                prompt = build_prompt(
                    cfg,
                    processor,
                    image=fields[image_field],
                    image_source=f"{where}.{image_field}",
                    audio=fields[audio_field] if audio_field else None,
                    audio_ext=audio_field or "wav",
                    audio_source=f"{where}.{audio_field}",
                    text=args.prompt,
                )
            except UserError as exc:
                skipped.append(str(exc))
                print(f"warning: skipping a record: {exc}", file=sys.stderr)
                continue
            yield key, reference, prompt


def _batch(args: argparse.Namespace, cfg: Config, device) -> None:
    from mimo_titan.data.webdataset import resolve_shards
    from mimo_titan.errors import DataError
    from mimo_titan.inference import load_model

    resolve_shards(args.data)  # a bad path fails before the model loads
    model, processor = load_model(cfg, args.checkpoint, device=device, hf=args.hf or None)
    params = _params(args)
    import torch

    generator = torch.Generator(device=device).manual_seed(params.seed)
    skipped: list[str] = []
    written = 0
    with open(args.out, "w", encoding="utf-8") as out:
        pending: list[tuple[str, str | None, Prompt]] = []
        for record in _records(args, cfg, processor, skipped):
            pending.append(record)
            if len(pending) == 4 * args.batch_size:
                written += _flush(pending, model, cfg, processor, params, args.batch_size, generator, out)
        written += _flush(pending, model, cfg, processor, params, args.batch_size, generator, out)
    if written == 0:
        why = f"; the first: {skipped[0]}" if skipped else ""
        raise DataError(f"--data {args.data}: no usable record ({len(skipped)} skipped{why})")
    print(f"wrote {written} lines to {args.out} ({len(skipped)} records skipped)", file=sys.stderr)


def _flush(pending, model, cfg, processor, params, batch_size, generator, out: TextIO) -> int:
    from mimo_titan.inference import generate_texts

    if not pending:
        return 0
    texts = generate_texts(
        model,
        cfg.model,
        processor,
        [p for _, _, p in pending],
        params,
        max_positions=cfg.training.seq_len,
        batch_size=batch_size,
        generator=generator,
    )
    for (key, reference, _), text in zip(pending, texts):
        out.write(json.dumps({"key": key, "reference": reference, "generated": text}, ensure_ascii=False) + "\n")
    n = len(pending)
    pending.clear()
    return n


def _params(args: argparse.Namespace):
    from mimo_titan.inference import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; a user error prints ``error: ...`` (one line) and returns 2."""
    try:
        args, overrides = _parser().parse_known_args(argv)
        _check_mode(args)
        if args.batch_size < 1:
            raise _UsageError(f"--batch-size {args.batch_size}: must be >= 1")
        from mimo_titan.config import load_config
        from mimo_titan.inference import resolve_device

        cfg = load_config(args.config, overrides)
        _params(args)  # option ranges, before the model loads
        device = resolve_device(args.device)
        if args.image is not None:
            _single(args, cfg, device)
        else:
            _batch(args, cfg, device)
    except (_UsageError, ValueError) as exc:  # mimo_titan's UserError (config, data, checkpoint) is a ValueError
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
