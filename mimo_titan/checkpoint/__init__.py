"""Checkpoints: DCP save / resume with resharding (:mod:`.manager`, :mod:`.state`) and Hugging Face weights
(:mod:`.hf`, used by ``scripts/convert_hf.py``)."""

from mimo_titan.checkpoint.manager import CheckpointManager, checkpoint_folder, complete_steps
from mimo_titan.checkpoint.state import load_full_model_state, save_full_model_state

__all__ = ["CheckpointManager", "checkpoint_folder", "complete_steps", "load_full_model_state", "save_full_model_state"]
