"""Plain nn.Modules with no mesh inside: ViT encoder + projector, decoder LM, and the MIMO merge."""

from mimo_titan.models.decoder import DecoderLM
from mimo_titan.models.mimo import LanguageStage, MimoModel, merge_image_embeddings, scatter_image_embeddings
from mimo_titan.models.vit import VisionEncoder

__all__ = [
    "DecoderLM",
    "LanguageStage",
    "MimoModel",
    "VisionEncoder",
    "merge_image_embeddings",
    "scatter_image_embeddings",
]
