"""Convert weights between Hugging Face directories and mimo_titan checkpoints (one process, CPU, no GPU needed).

Import (HF → a model-only checkpoint to start training from)::

    python scripts/convert_hf.py import --config train_configs/X.toml --hf-language LLAMA_OR_QWEN3_DIR \\
        [--hf-vision SIGLIP_DIR] [--projector multi_modal_projector.safetensors] \\
        [--hf-audio WHISPER_DIR] [--audio-projector audio_projector.safetensors] --out CKPT_DIR
    torchrun ... scripts/train.py --config train_configs/X.toml --checkpoint.initial_load_path=CKPT_DIR

The model is built from ``[model]`` of the config and initialised as training would (``job.seed``); the HF weights
replace the language model, the ViT and / or the audio encoder (the configs must match exactly); a projector keeps
its fresh initialisation unless ``--projector`` / ``--audio-projector`` (or the file an export writes beside
``--hf-vision`` / ``--hf-audio``) is given.

Export (a training checkpoint → HF directories)::

    python scripts/convert_hf.py export --config train_configs/X.toml --checkpoint OUT/checkpoint/step-N \\
        --out DIR --language-arch {llama,qwen3,qwen3_moe}

writes ``DIR/language/`` (``from_pretrained``-loadable causal LM, with the run's tokenizer files copied in),
``DIR/vision/`` (``SiglipVisionModel``) and ``DIR/multi_modal_projector.safetensors``, and for an audio encoder
``DIR/audio/`` (``WhisperEncoder``) and ``DIR/audio_projector.safetensors`` (directories named as the modules).

Both commands accept config overrides after the options (``--section.key=value``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

from mimo_titan.checkpoint.hf import LM_ARCHS, export_hf, import_hf
from mimo_titan.config import Config, load_config
from mimo_titan.config_help import CONFIG_KEYS_EPILOG
from mimo_titan.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=CONFIG_KEYS_EPILOG)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF directories -> model-only mimo_titan checkpoint", epilog=CONFIG_KEYS_EPILOG)
    imp.add_argument("--config", required=True, help="the training TOML")
    imp.add_argument("--hf-language", help="HF causal-LM directory (Llama-3, Qwen3, Qwen3-MoE)")
    imp.add_argument("--hf-vision", help="HF SigLIP vision directory")
    imp.add_argument("--projector", help="projector safetensors (multi_modal_projector.* keys)")
    imp.add_argument("--hf-audio", help="HF Whisper directory (its encoder is imported)")
    imp.add_argument("--audio-projector", help="the audio encoder's projector safetensors (projector.* keys)")
    imp.add_argument("--out", required=True, help="checkpoint directory to write")
    exp = sub.add_parser("export", help="mimo_titan checkpoint -> HF directories", epilog=CONFIG_KEYS_EPILOG)
    exp.add_argument("--config", required=True, help="the training TOML of the run")
    exp.add_argument("--checkpoint", required=True, help="checkpoint directory (step-N, or a model-only one)")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--language-arch", required=True, choices=sorted(LM_ARCHS), help="HF architecture of the LM")
    return p


def run_import(
    cfg: Config,
    hf_language: str | None,
    hf_vision: str | None,
    projector: str | None,
    out: str,
    hf_audio: str | None = None,
    audio_projector: str | None = None,
) -> None:
    """Fresh model (``init_weights(job.seed)``) + HF weights → model-only checkpoint ``out``."""
    from mimo_titan.checkpoint import save_full_model_state
    from mimo_titan.models import MimoModel
    from mimo_titan.train.trainer import build_processor

    if not (hf_language or hf_vision or projector or hf_audio or audio_projector):
        raise SystemExit("import: give at least one of --hf-language, --hf-vision, --projector, --hf-audio")
    proc = build_processor(cfg)
    model = MimoModel(cfg.model, proc.image_token_id, audio_token_id=proc.audio_token_id if proc.audio_tokens else None)
    model.init_weights(cfg.job.seed)
    state = import_hf(
        cfg.model,
        model.state_dict(),
        hf_language,
        hf_vision,
        projector,
        audio_dir=hf_audio,
        audio_projector_path=audio_projector,
    )
    model.load_state_dict(state, strict=True)  # the overlaid state fits the model
    save_full_model_state(model.state_dict(), out)
    print(f"wrote {out}; train from it with --checkpoint.initial_load_path={out}")


def run_export(cfg: Config, checkpoint: str, out: str, language_arch: str) -> None:
    """Checkpoint ``checkpoint`` → ``out/language``, ``out/vision``, ``out/multi_modal_projector.safetensors``."""
    from mimo_titan.checkpoint import load_full_model_state
    from mimo_titan.train.trainer import build_processor

    state = load_full_model_state(checkpoint, cfg)
    export_hf(cfg.model, state, out, language_arch)
    tok, lm_dir = cfg.data.tokenizer, os.path.join(out, cfg.model.language_name)
    if os.path.isdir(tok):  # make the LM directory usable with AutoTokenizer too
        for name in os.listdir(tok):
            if name.startswith("tokenizer_config") or name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
                shutil.copy(os.path.join(tok, name), os.path.join(lm_dir, name))
    # the tokenizer as the run used it: merges repaired in memory, the audio placeholders it added
    build_processor(cfg).save_tokenizer(os.path.join(lm_dir, "tokenizer.json"))
    print(f"wrote {', '.join(sorted(os.listdir(out)))} under {out} ({cfg.model.language_name}: {language_arch})")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run it; a user's mistake (a config, checkpoint or HF directory that does not fit)
    ends the program with one line (``convert_hf: ...``), not a traceback."""
    try:
        _main(argv)
    except (UserError, ValueError) as exc:
        raise SystemExit(f"convert_hf: {type(exc).__name__}: {exc}") from None


def _main(argv: list[str] | None) -> None:
    args, overrides = _parser().parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    with torch.no_grad():
        if args.command == "import":
            run_import(
                cfg, args.hf_language, args.hf_vision, args.projector, args.out, args.hf_audio, args.audio_projector
            )
        else:
            run_export(cfg, args.checkpoint, args.out, args.language_arch)


if __name__ == "__main__":
    main(sys.argv[1:])
