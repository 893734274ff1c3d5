"""Generation from a trained MIMO model in one process: loading (:mod:`.loading`), prompts (:mod:`.prompt`), token
choice (:mod:`.sampling`) and the decoding loop with a KV cache (:mod:`.generate`). ``scripts/generate.py`` is the
command line."""

from mimo_titan.inference.generate import generate_texts, generate_tokens, prompt_encoder_inputs
from mimo_titan.inference.loading import load_model, model_from_state, resolve_checkpoint, resolve_device
from mimo_titan.inference.prompt import Prompt, build_prompt, read_media
from mimo_titan.inference.sampling import SamplingParams, next_tokens

__all__ = [
    "Prompt",
    "SamplingParams",
    "build_prompt",
    "generate_texts",
    "generate_tokens",
    "load_model",
    "model_from_state",
    "next_tokens",
    "prompt_encoder_inputs",
    "read_media",
    "resolve_checkpoint",
    "resolve_device",
]
