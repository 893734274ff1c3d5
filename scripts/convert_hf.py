"""Convert weights between Hugging Face directories and mimo_titan checkpoints (one process, CPU, no GPU needed).

Import (HF → a model-only checkpoint to start training from)::

    python scripts/convert_hf.py import --config train_configs/X.toml --hf-language LLAMA_OR_QWEN3_DIR \\
        [--hf-vision SIGLIP_DIR] [--projector multi_modal_projector.safetensors] --out CKPT_DIR
    torchrun ... scripts/train.py --config train_configs/X.toml --checkpoint.initial_load_path=CKPT_DIR

The model is built from ``[model]`` of the config and initialised as training would (``job.seed``); the HF weights
replace the language model and / or the ViT (the configs must match exactly); the projector keeps its fresh
initialisation unless ``--projector`` (or a ``multi_modal_projector.safetensors`` beside ``--hf-vision``) is given.

Export (a training checkpoint → HF directories)::

    python scripts/convert_hf.py export --config train_configs/X.toml --checkpoint OUT/checkpoint/step-N \\
        --out DIR --language-arch {llama,qwen3,qwen3_moe}

writes ``DIR/language/`` (``from_pretrained``-loadable causal LM, with the run's tokenizer files copied in),
``DIR/vision/`` (``SiglipVisionModel``) and ``DIR/multi_modal_projector.safetensors``.

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF directories -> model-only mimo_titan checkpoint")
    imp.add_argument("--config", required=True, help="the training TOML")
    imp.add_argument("--hf-language", help="HF causal-LM directory (Llama-3, Qwen3, Qwen3-MoE)")
    imp.add_argument("--hf-vision", help="HF SigLIP vision directory")
    imp.add_argument("--projector", help="projector safetensors (multi_modal_projector.* keys)")
    imp.add_argument("--out", required=True, help="checkpoint directory to write")
    exp = sub.add_parser("export", help="mimo_titan checkpoint -> HF directories")
    exp.add_argument("--config", required=True, help="the training TOML of the run")
    exp.add_argument("--checkpoint", required=True, help="checkpoint directory (step-N, or a model-only one)")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--language-arch", required=True, choices=sorted(LM_ARCHS), help="HF architecture of the LM")
    return p


def run_import(cfg: Config, hf_language: str | None, hf_vision: str | None, projector: str | None, out: str) -> None:
    """Fresh model (``init_weights(job.seed)``) + HF weights → model-only checkpoint ``out``."""
    from mimo_titan.checkpoint import save_full_model_state
    from mimo_titan.models import MimoModel
    from mimo_titan.train.trainer import build_processor

    if not (hf_language or hf_vision or projector):
        raise SystemExit("import: give at least one of --hf-language, --hf-vision, --projector")
    model = MimoModel(cfg.model, build_processor(cfg).image_token_id)
    model.init_weights(cfg.job.seed)
    state = import_hf(cfg.model, model.state_dict(), hf_language, hf_vision, projector)
    model.load_state_dict(state, strict=True)  # the overlaid state fits the model
    save_full_model_state(model.state_dict(), out)
    print(f"wrote {out}; train from it with --checkpoint.initial_load_path={out}")


def run_export(cfg: Config, checkpoint: str, out: str, language_arch: str) -> None:
    """Checkpoint ``checkpoint`` → ``out/language``, ``out/vision``, ``out/multi_modal_projector.safetensors``."""
    from mimo_titan.checkpoint import load_full_model_state

    state = load_full_model_state(checkpoint, cfg)
    export_hf(cfg.model, state, out, language_arch)
    tok = cfg.data.tokenizer
    if os.path.isdir(tok):  # make the LM directory usable with AutoTokenizer too
        for name in os.listdir(tok):
            if name.startswith("tokenizer") or name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
                shutil.copy(os.path.join(tok, name), os.path.join(out, "language", name))
    print(f"wrote {out}/language ({language_arch}), {out}/vision (siglip), {out}/multi_modal_projector.safetensors")


def main(argv: list[str] | None = None) -> None:
    args, overrides = _parser().parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    with torch.no_grad():
        if args.command == "import":
            run_import(cfg, args.hf_language, args.hf_vision, args.projector, args.out)
        else:
            run_export(cfg, args.checkpoint, args.out, args.language_arch)


if __name__ == "__main__":
    main(sys.argv[1:])
